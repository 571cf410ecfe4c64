"""Full weight sync into a running ``vroll serve``: bucketed vs one call per tensor vs the floor.

For each model (``--models``: ``embedded`` SmolLM2-135M, ``random`` a random-weight ~0.5B
model of a real architecture, ``dir`` the folder given by ``--model-dir``) it starts a
server (``--dp`` x ``--tp``) and measures, in one run: ``bucketed_s`` (``WeightSender.push``,
median of ``--repeats``, with the sender's own per-phase timings), ``per_tensor_s`` (TRL's
way: one update call per tensor; ``--per-tensor-limit N`` times N and extrapolates) and
``floor_s`` (bytes / the bandwidth of one big broadcast over the same kind of group).
Goal: bucketed/floor <= 2x. ``*_output_matches`` check that greedy outputs after syncing
the same weights are unchanged. On CPU keep the machine otherwise idle.

    python benchmarks/weight_sync.py                                 # both models, DP=1
    python benchmarks/weight_sync.py --dp 2 --bucket-mb 512,64,8
    python benchmarks/weight_sync.py --backend nccl --device cuda    # trainer on cuda:0, server on the next GPUs
    python benchmarks/weight_sync.py --models embedded --per-tensor-limit 20 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import (
    ServerProcess,
    cuda_available,
    default_out,
    machine_info,
    median,
    print_table,
    running_server,
    write_json,
)

from vroll.client import GenerationClient
from vroll.protocol import Bucket, TensorMeta
from vroll.weightsync.group import SyncGroup, host_store, join_store, make_group
from vroll.weightsync.sender import PhaseTimes, WeightSender, WeightSyncConfig
from vroll.weightsync.source import ModelSource

NAME = "weight_sync"
GOAL_OVER_FLOOR = 2.0
CHECK_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # Llama layout, ~0.47B parameters with the embedded vocabulary (untied lm_head).
    "llama-0.5b": dict(model_type="llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    # Qwen2-0.5B layout (qkv biases, tied embeddings), ~0.40B parameters with the embedded vocabulary.
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="embedded,random", help="comma list of: embedded, random, dir")
    p.add_argument("--model-dir", default=None,
                   help="model folder for --models dir (loaded in bf16; result key: the folder's name)")
    p.add_argument("--random-preset", choices=sorted(RANDOM_PRESETS), default="llama-0.5b")
    p.add_argument("--random-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--dp", type=int, default=1, help="server data-parallel size (replicas)")
    p.add_argument("--tp", type=int, default=1, help="server tensor-parallel size (workers per replica)")
    p.add_argument("--bucket-mb", default="512", help="comma list of bucket sizes in MiB (first = headline)")
    p.add_argument("--repeats", type=int, default=3, help="timed bucketed pushes per size (median)")
    p.add_argument("--per-tensor-limit", type=int, default=0,
                   help="time only the first N per-tensor calls and extrapolate (0: all tensors)")
    p.add_argument("--floor-mb", type=float, default=256.0, help="tensor size of the bandwidth measurement")
    p.add_argument("--floor-repeats", type=int, default=3)
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="weight-sync process group")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the trainer's model lives (cuda: cuda:0, server on the next dp*tp GPUs)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="server without torch.compile/CUDA graphs (faster start; sync cost is the same)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-memory-gib", type=float, default=None if cuda_available() else 0.5)
    p.add_argument("--timeout-s", type=float, default=600.0, help="weight-sync group timeout (1..600)")
    p.add_argument("--out", default=default_out(NAME), help="JSON results path")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.bucket_mb = [float(x) for x in str(args.bucket_mb).split(",") if x.strip()]
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = set(args.models) - {"embedded", "random", "dir"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; use embedded, random and/or dir")
    if ("dir" in args.models) != (args.model_dir is not None):
        p.error("--models dir and --model-dir go together")
    if args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir}: no config.json there")
    if args.dp < 1 or args.tp < 1:
        p.error("--dp and --tp must be >= 1")
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 1 + args.dp * args.tp:
            p.error(f"--device cuda needs 1 GPU for the trainer + {args.dp}x{args.tp} (dp x tp) for the server, "
                    f"found {gpus}")


# ---------------------------------------------------------------------------- devices


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """Keep GPU 0 for the trainer when its model is on cuda (NCCL needs one GPU per rank)."""
    if args.device != "cuda":
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible_gpus()[1 : 1 + args.dp * args.tp])}


def trainer_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


# ---------------------------------------------------------------------------- floor


def _floor_receiver(port: int, rank: int, world: int, backend: str, numel: int, rounds: int,
                    timeout_s: float) -> None:
    """Spawned: one receiving rank of the bandwidth measurement."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = join_store("127.0.0.1", port, world, timeout_s)
    group = make_group(store, rank, world, backend, timeout_s, "floor")
    buf = torch.empty(numel, dtype=torch.bfloat16, device=group.device)
    for _ in range(rounds):
        group.broadcast(buf, src=0)
        group.all_ok(True)
    group.close()


def _broadcast_round(group: SyncGroup, tensor: torch.Tensor) -> float:
    start = time.perf_counter()
    group.broadcast(tensor, src=0)
    group.all_ok(True)  # returns once every receiver holds every byte (syncs the GPU stream too)
    return time.perf_counter() - start


def measure_floor(args: argparse.Namespace, receivers: int) -> dict[str, Any]:
    """Bandwidth of one big broadcast from this process to ``receivers`` spawned processes."""
    numel = int(args.floor_mb * 2**20) // 2
    rounds = 1 + args.floor_repeats
    world = 1 + receivers
    store = host_store("127.0.0.1", 0, world, args.timeout_s)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_floor_receiver, args=(store.port, r, world, args.backend, numel, rounds,
                                                       args.timeout_s)) for r in range(1, world)]
    for proc in procs:
        proc.start()
    group = make_group(store, 0, world, args.backend, args.timeout_s, "floor")
    tensor = torch.ones(numel, dtype=torch.bfloat16, device=group.device)
    seconds = [_broadcast_round(group, tensor) for _ in range(rounds)][1:]
    group.close()
    for proc in procs:
        proc.join(60)
    nbytes = numel * 2
    med = median(seconds)
    print(f"floor: {nbytes / 2**20:.0f} MiB to {receivers} receiver(s) over {args.backend}: "
          f"{med:.3f} s, {nbytes / med / 1e9:.2f} GB/s", flush=True)
    return {"bytes": nbytes, "receivers": receivers, "backend": args.backend, "seconds": seconds,
            "median_s": med, "gb_per_s": nbytes / med / 1e9}


# ---------------------------------------------------------------------------- models


def load_embedded(device: torch.device) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    from vroll.models import resolve_model

    path = resolve_model(None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device), path


def load_dir(folder: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model in ``folder`` (e.g. from make_model.py), in bf16, on the trainer's device."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    path = str(Path(folder).resolve())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    print(f"{Path(path).name}: loaded from {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return model, path


def random_config(args: argparse.Namespace) -> Any:
    from transformers import AutoConfig

    from vroll.models import resolve_model

    base = AutoConfig.from_pretrained(resolve_model(None))
    preset = dict(RANDOM_PRESETS[args.random_preset])
    if args.random_layers is not None:
        preset["num_hidden_layers"] = args.random_layers
    model_type = preset.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=base.vocab_size, bos_token_id=base.bos_token_id,
                                eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
                                max_position_embeddings=4096, dtype="bfloat16", **preset)


def save_with_tokenizer(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` + the embedded model's tokenizer files: a folder vLLM can serve."""
    from vroll.models import resolve_model

    model.save_pretrained(folder, safe_serialization=True)
    skip = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
    for f in Path(resolve_model(None)).iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, folder / f.name)


@contextlib.contextmanager
def random_model(args: argparse.Namespace, device: torch.device) -> Iterator[tuple[torch.nn.Module, str]]:
    """A random-weight model of a real architecture, saved to a temporary folder (removed after)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(random_config(args), dtype=torch.bfloat16)
    folder = Path(tempfile.mkdtemp(prefix="vroll-bench-model-"))
    try:
        save_with_tokenizer(model, folder)
        print(f"random {args.random_preset}: {n_params(model) / 1e6:.0f}M params, built and saved to {folder} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        yield model.to(device), str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def n_params(model: torch.nn.Module) -> int:
    return sum(m.numel for m in ModelSource(model, torch.bfloat16).metadata())


# ---------------------------------------------------------------------------- syncs


def greedy(client: GenerationClient) -> list[list[int]] | str:
    """Greedy token ids for the check prompts, or the error a broken model causes."""
    try:
        out = client.generate(CHECK_PROMPTS, temperature=0.0, max_tokens=8)
    except Exception as exc:  # e.g. NaN logprobs from corrupted weights fail the response's validation
        return f"generate failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return [c.token_ids for c in out.flat()]


PHASES = [f.name for f in dataclasses.fields(PhaseTimes)]


def bucketed(ws: WeightSender, model: torch.nn.Module, bucket_mb: float, repeats: int) -> dict[str, Any]:
    """Warm-up push, then ``repeats`` timed pushes at one bucket size (with the sender's phase times)."""
    ws.config.bucket_mb = bucket_mb
    ws.push(model)
    stats = [ws.push(model) for _ in range(repeats)]
    med = median([s.seconds for s in stats])
    s = stats[0]
    mean_phases = {k: sum(getattr(x.phases, k) for x in stats) / repeats for k in PHASES}
    print(f"  bucketed {bucket_mb:g} MiB: {s.num_buckets} buckets, {med:.3f} s, {s.num_bytes / med / 1e9:.2f} GB/s "
          f"({', '.join(f'{k} {v:.3f}' for k, v in mean_phases.items())})", flush=True)
    return {"bucket_mb": bucket_mb, "num_buckets": s.num_buckets, "num_tensors": s.num_tensors,
            "bytes": s.num_bytes, "seconds": [x.seconds for x in stats], "median_s": med,
            "gb_per_s": s.num_bytes / med / 1e9, "phases_mean_s": mean_phases}


def one_tensor_call(ws: WeightSender, source: ModelSource, meta: TensorMeta) -> float:
    """One TRL-style update: a one-tensor manifest, its broadcast, the barrier, the status wait."""
    assert ws.group is not None and ws.session_id is not None
    start = time.perf_counter()
    bucket = Bucket(meta.dtype, (meta,))
    update = ws.client.weights_update(ws.session_id, [bucket], ws.config.atomic, allow_partial_layers=True)
    ws.send_bucket(source, bucket)
    ws.group.all_ok(True)
    status = ws.client.weights_status(ws.session_id, update.update_id)
    if status.state == "failed":
        raise RuntimeError(f"per-tensor update of {meta.name} failed: {status.error}")
    return time.perf_counter() - start


def extrapolate(calls: list[tuple[int, float]], rest: list[int]) -> tuple[float, dict[str, float]]:
    """Seconds for the untimed tensors (sizes ``rest``) from a line ``a + b*bytes`` fitted to ``calls``."""
    xs = torch.tensor([float(b) for b, _ in calls], dtype=torch.float64)
    ys = torch.tensor([s for _, s in calls], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], dim=1)
    a, b = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0].tolist()
    if a < 0 or b < 0:  # a degenerate fit: fall back to the mean seconds per call
        a, b = float(ys.mean()), 0.0
    return sum(a + b * n for n in rest), {"a_s_per_call": a, "b_s_per_byte": b}


def per_tensor(ws: WeightSender, model: torch.nn.Module, limit: int) -> dict[str, Any]:
    """Time one call per tensor (the first ``limit`` if > 0) and extrapolate the rest."""
    assert ws.dtype is not None
    source = ModelSource(model, ws.dtype)
    metas = source.metadata()
    todo = metas[:limit] if limit > 0 else metas
    with source.session():
        calls = [(m.nbytes, one_tensor_call(ws, source, m)) for m in todo]
    measured = sum(s for _, s in calls)
    rest = [m.nbytes for m in metas[len(todo):]]
    extra, fit = extrapolate(calls, rest) if rest else (0.0, {})
    total = measured + extra
    nbytes = sum(m.nbytes for m in metas)
    tag = f" (timed {len(todo)}/{len(metas)}, rest extrapolated)" if rest else ""
    print(f"  per-tensor: {len(metas)} calls, {total:.3f} s{tag}, {nbytes / total / 1e9:.3f} GB/s", flush=True)
    return {"num_tensors": len(metas), "timed_tensors": len(todo), "extrapolated": bool(rest),
            "measured_s": measured, "seconds": total, "call_s": [s for _, s in calls], "fit": fit,
            "gb_per_s": nbytes / total / 1e9}


def bench_model(args: argparse.Namespace, label: str, model: torch.nn.Module, path: str,
                floor: dict[str, Any]) -> dict[str, Any]:
    """Start a server on ``path`` and run the bucketed, per-tensor and floor comparisons."""
    print(f"{label}: {path}", flush=True)
    with running_server(serve_flags(args, path), server_env(args)) as server:
        return sync_all(args, server, model, floor) | {"model": label, "path": path, "params": n_params(model)}


def sync_all(args: argparse.Namespace, server: ServerProcess, model: torch.nn.Module,
             floor: dict[str, Any]) -> dict[str, Any]:
    client = server.client(timeout=3600.0)
    ws = WeightSender(client, WeightSyncConfig(bucket_mb=args.bucket_mb[0], backend=args.backend,
                                                   timeout_s=args.timeout_s))
    ws.connect()
    try:
        reference = greedy(client)
        if isinstance(reference, str):
            raise RuntimeError(f"the freshly started server cannot generate: {reference}")
        sweep = [bucketed(ws, model, mb, args.repeats) for mb in args.bucket_mb]
        outputs = {"reference": reference, "bucketed": greedy(client)}
        pt = per_tensor(ws, model, args.per_tensor_limit)
        outputs["per_tensor"] = greedy(client) if not pt["extrapolated"] else None
        ws.config.bucket_mb = args.bucket_mb[0]
        ws.push(model)  # put every weight back, whatever the per-tensor run left
        outputs["restored"], *later = [greedy(client) for _ in range(3)]
    finally:
        ws.close()
        client.close()
    matches = {f"{k}_output_matches": None if v is None else v == reference
               for k, v in outputs.items() if k != "reference"}
    later_ok = {"restored_later_calls_match": [o == reference for o in later]}
    return summarize(sweep, pt, floor) | matches | later_ok | {"greedy_outputs": outputs}


def summarize(sweep: list[dict[str, Any]], pt: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    nbytes = sweep[0]["bytes"]
    bucketed_s = sweep[0]["median_s"]
    floor_s = nbytes / (floor["gb_per_s"] * 1e9)
    return {"bytes": nbytes, "num_tensors": pt["num_tensors"], "bucket_mb": sweep[0]["bucket_mb"],
            "bucketed_s": bucketed_s, "per_tensor_s": pt["seconds"], "floor_s": floor_s,
            "per_tensor_extrapolated": pt["extrapolated"],
            "gb_per_s": {"bucketed": nbytes / bucketed_s / 1e9, "per_tensor": pt["gb_per_s"],
                         "floor": floor["gb_per_s"]},
            "bucketed_over_floor": bucketed_s / floor_s, "per_tensor_over_bucketed": pt["seconds"] / bucketed_s,
            "within_goal": bucketed_s / floor_s <= GOAL_OVER_FLOOR,
            "bucket_sweep": sweep, "per_tensor": pt}


def serve_flags(args: argparse.Namespace, path: str) -> list[str]:
    flags = ["--model", path, "--data-parallel-size", str(args.dp), "--tensor-parallel-size", str(args.tp),
             "--max-model-len", str(args.max_model_len), "--enforce-eager", str(args.enforce_eager).lower(),
             "--log-level", "warning"]
    if args.kv_cache_memory_gib is not None:
        flags += ["--kv-cache-memory-gib", str(args.kv_cache_memory_gib)]
    return flags


# ---------------------------------------------------------------------------- report


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows = [[r["model"], r["bytes"] / 1e9, r["bucketed_s"], r["per_tensor_s"], r["floor_s"],
             r["gb_per_s"]["bucketed"], r["gb_per_s"]["floor"], r["bucketed_over_floor"],
             r["per_tensor_over_bucketed"]] for r in results]
    print_table(["model", "GB", "bucketed s", "per-tensor s", "floor s", "bucketed GB/s", "floor GB/s",
                 "bucketed/floor", "per-tensor/bucketed"], rows,
                title=f"full weight sync, DP={args.dp}, TP={args.tp}, {args.backend}, bucket {args.bucket_mb[0]:g} MiB "
                      f"(median of {args.repeats})")
    phases = [[r["model"], *r["bucket_sweep"][0]["phases_mean_s"].values(), r["bucketed_s"]] for r in results]
    print_table(["model", *PHASES, "total (median)"], phases,
                title="where a bucketed push spends its seconds (mean per push)")
    if len(args.bucket_mb) > 1:
        sweep = [[r["model"], b["bucket_mb"], b["num_buckets"], b["median_s"], b["gb_per_s"],
                  b["median_s"] / r["floor_s"]] for r in results for b in r["bucket_sweep"]]
        print_table(["model", "bucket MiB", "buckets", "seconds", "GB/s", "/floor"], sweep, title="bucket sweep")
    for r in results:
        verdict = "OK" if r["within_goal"] else "ABOVE GOAL"
        note = " (per-tensor extrapolated)" if r["per_tensor_extrapolated"] else ""
        print(f"{r['model']}: bucketed/floor = {r['bucketed_over_floor']:.2f}x (goal <= {GOAL_OVER_FLOOR:g}x): "
              f"{verdict}; bucketing is {r['per_tensor_over_bucketed']:.1f}x faster than per-tensor{note}; "
              f"outputs after sync match: bucketed={r['bucketed_output_matches']}, "
              f"per-tensor={r['per_tensor_output_matches']}, restored={r['restored_output_matches']}")


def run_models(args: argparse.Namespace, device: torch.device, floor: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    if "embedded" in args.models:
        model, path = load_embedded(device)
        results.append(bench_model(args, "embedded", model, path, floor))
        del model
    if "random" in args.models:
        with random_model(args, device) as (model, path):
            results.append(bench_model(args, f"random-{args.random_preset}", model, path, floor))
    if "dir" in args.models:
        model, path = load_dir(args.model_dir, device)
        results.append(bench_model(args, Path(path).name, model, path, floor))
        del model
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    device = trainer_device(args)
    floor = measure_floor(args, receivers=args.dp * args.tp)  # one receiving worker per replica and TP rank
    results = run_models(args, device, floor)
    report(results, args)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = write_json(args.out, {"benchmark": NAME, "machine": machine_info(), "config": config,
                                 "goal_bucketed_over_floor": GOAL_OVER_FLOOR, "floor": floor,
                                 "load_avg_at_start": load_at_start, "models": {r["model"]: r for r in results}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
