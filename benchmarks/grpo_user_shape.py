"""GRPO at the shapes users train: a 151,936-token vocabulary, long completions of uneven length.

The sibling of ``grpo_step.py`` (issue 29). One optimizer step = one generation batch of
``--prompts`` x ``--generations`` completions, trained in micro-batches of ``--micro``
completions over ``--prompts * --generations / --micro`` accumulation steps; vLLM colocated in
the trainer's process (sleeping while it trains, ``--sleep``); bf16 autocast; gradient
checkpointing; vowel_share reward (random weights: every group's rewards differ, every row trains);
dapo loss; token-level truncated importance sampling (cap 2) on both sides.

Completion lengths are imposed (``benchmarks/_lengths.py``): each completion's length is drawn
between ``--min-completion`` and ``--max-completion`` (``--skew`` 3: long-tailed, mean
min + (max - min) / 4), identically on every leg and every step, so padding shows.

Legs (each in its own process, one after another):

- ``vroll-today``: ``python -m vroll grpo --vllm_mode colocate`` on the padded path (``--padding_free
  false --logps_chunk_tokens 0``): each micro-batch of ``--today-micro`` rows padded to its longest, the
  full (rows, C, V) fp32 logits;
- ``vroll``: the new defaults (packed rows, chunked lm_head) and ``--max_tokens_per_micro_batch
  --token-budget``: each step's rows re-cut into micro-batches of at most that many packed tokens
  (``--vroll-flags`` adds flags to both vroll legs);
- ``trl``: TRL's ``GRPOTrainer`` (1.16: its lm_head is chunked already; no ``padding_free`` for
  GRPO), colocated vLLM, ``vllm_importance_sampling_mode="token_truncate"`` as vroll's;
- ``trl-liger``: the same with ``use_liger_kernel=True`` (in 1.16: Liger's RMSNorm/RoPE/SwiGLU
  kernels only; its fused GRPO loss is not used by TRL any more).

Per leg, the mean of the steps after ``--warmup``: seconds per step, generation and train-phase
seconds (TRL: step minus its ``_generate``; this includes its extra no-grad forward for the
importance ratio), peak CUDA memory of the trainer process (the torch allocator's: a sleeping
vLLM's memory is in its own pool), trained tokens/s, the share of the trained tokens that is
padding (from the imposed lengths and how each side pads: vroll today trims each micro-batch to its
longest row, vroll packed runs no padding, TRL pads the whole batch to its longest; the vroll legs also
report their own ``train/padding_share``, ``train/micro_batches`` and ``train/tokens``), and the
train phase's model-FLOPs utilization against the GPU's dense bf16 peak (real tokens only; gradient checkpointing's
recompute counted as a forward; LoRA: no weight gradients for the frozen matrices).

    python benchmarks/grpo_user_shape.py --model /tmp/q15 --legs vroll-today,vroll,trl  # GPU (run_user_shape.sh)
    python benchmarks/grpo_user_shape.py --shape tiny --prompts 2 --generations 4 --micro 4 --today-micro 2 \\
        --min-completion 8 --max-completion 32 --token-budget 320 --steps 2 \\
        --legs vroll-today,vroll,trl,trl-liger                                           # CPU smoke
    python benchmarks/grpo_user_shape.py --merge a.json b.json                          # one table from calls
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import cuda_available, default_out, machine_info, print_table, write_json
from _lengths import ENV_PEAK, LengthSpec, spec_env

BENCH = Path(__file__).resolve().parent
# dense bf16 peaks (no sparsity) by device name
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
               "A100": 312.0}


def peak_tflops(given: float | None) -> float | None:
    if given or not cuda_available():
        return given
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def ensure_model(args: argparse.Namespace, tmp: Path) -> str:
    """``--model``, or a random-weight ``--shape`` model built into a temporary folder."""
    if args.model:
        return args.model
    out = tmp / f"{args.shape}-v{args.vocab_size}"
    subprocess.run([sys.executable, str(BENCH / "gpu/make_model.py"), "--shape", args.shape, "--vocab-size",
                    str(args.vocab_size), "--out", str(out)], check=True)
    return str(out)


def accumulation(args: argparse.Namespace, micro: int) -> int:
    total = args.prompts * args.generations
    if total % micro:
        raise SystemExit(f"--prompts x --generations ({total}) must be a multiple of the micro-batch ({micro})")
    return total // micro


def vroll_micro(leg: str, args: argparse.Namespace) -> int:
    return (args.today_micro or args.micro) if leg == "vroll-today" else args.micro


def vroll_flags(leg: str, args: argparse.Namespace, model: str, out: Path) -> list[str]:
    micro = vroll_micro(leg, args)
    flags = ["grpo", "--model_name_or_path", model, "--output_dir", str(out), "--max_steps", str(args.steps),
             "--dataset_size", "2000", "--reward_funcs", "vowel_share", "--save_final_model", "false",
             "--save_only_model", "true", "--per_device_train_batch_size", str(micro),
             "--gradient_accumulation_steps", str(accumulation(args, micro)),
             "--num_generations", str(args.generations),
             "--max_completion_length", str(args.max_completion), "--learning_rate", "1e-6", "--loss_type", "dapo",
             "--temperature", "1.0", "--seed", "0", "--bf16", "true", "--torch_dtype", args.dtype,
             "--gradient_checkpointing", str(args.gradient_checkpointing).lower(), "--vllm_mode", "colocate",
             "--vllm_importance_sampling_cap", "2.0"]
    if cuda_available():
        flags += ["--vllm_gpu_memory_utilization", str(args.vllm_memory),
                  "--vllm_enable_sleep_mode", str(args.sleep).lower()]
    else:
        flags += ["--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "1"]
    if args.lora:
        flags += ["--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear"]
    if leg == "vroll-today":
        flags += ["--padding_free", "false", "--logps_chunk_tokens", "0"]
    else:
        flags += ["--max_tokens_per_micro_batch", str(args.token_budget)]
    return flags + args.vroll_flags.split()


def run_child(name: str, cmd: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A leg in its own process, under the length patch; returns its peak-memory file's contents."""
    peak = tmp / f"{name}-peak.json"
    env = {**os.environ, **spec_env(length_spec(args)), ENV_PEAK: str(peak),
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), str(BENCH), os.environ.get("PYTHONPATH", "")])}
    print(f"  {name}: {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} leg failed (log {tmp / f'{name}.log'}):\n{proc.stderr[-3000:]}")
    return json.loads(peak.read_text())


def length_spec(args: argparse.Namespace) -> LengthSpec:
    return LengthSpec(seed=args.length_seed, low=args.min_completion, high=args.max_completion, skew=args.skew)


def run_vroll(leg: str, args: argparse.Namespace, model: str, tmp: Path) -> dict[str, Any]:
    out = tmp / leg
    cmd = [sys.executable, str(BENCH / "_lengths.py"), "-m", "vroll", *vroll_flags(leg, args, model, out)]
    child = run_child(leg, cmd, args, tmp)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]

    def mean(key: str) -> float | None:
        return sum(r[key] for r in rows) / len(rows) if rows and key in rows[0] else None

    return {"leg": leg, "step_s": mean("time/step_s"), "generate_s": mean("time/generate_s"),
            "train_s": mean("time/train_s"), "sync_s": mean("time/sync_s"), "reward_mean": mean("reward/mean"),
            "micro": vroll_micro(leg, args), "padding": "micro-batch" if leg == "vroll-today" else "packed",
            "micro_batches_measured": mean("train/micro_batches"),
            "padding_share_measured": mean("train/padding_share"),
            "tokens_measured": mean("train/tokens"), **_child_fields(child, args)}


def _child_fields(child: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    lengths = child["imposed_lengths"][args.warmup:args.steps]
    return {"peak_cuda_gib": None if child["peak_cuda_bytes"] is None else child["peak_cuda_bytes"] / 2**30,
            "imposed_lengths": lengths, "steps_measured": len(lengths)}


def run_trl(leg: str, args: argparse.Namespace, model: str, tmp: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer in a child process under the length patch (``--trl-child``)."""
    config = tmp / f"{leg}-config.json"
    config.write_text(json.dumps(vars(args) | {"model": model, "output_dir": str(tmp / leg),
                                               "result": str(tmp / f"{leg}-result.json")}))
    cmd = [sys.executable, str(BENCH / "_lengths.py"), "-m", "grpo_user_shape", "--trl-child", leg, str(config)]
    child = run_child(leg, cmd, args, tmp)
    t = json.loads((tmp / f"{leg}-result.json").read_text())
    step, gen = t["step_s"][args.warmup:], t["generate_s"][args.warmup:]
    mean_step, mean_gen = sum(step) / len(step), sum(gen) / len(gen)
    return {"leg": leg, "step_s": mean_step, "generate_s": mean_gen, "train_s": mean_step - mean_gen,
            "sync_s": None, "reward_mean": sum(t["reward_mean"][args.warmup:]) / max(1, len(t["reward_mean"][
                args.warmup:])), "micro": args.trl_micro or args.micro, "padding": "batch",
            "trl_version": t["trl_version"], **_child_fields(child, args)}


def trl_child(leg: str, config_path: str) -> int:
    """Inside the child: train ``steps`` GRPO steps with TRL, time them, write the result file."""
    import torch
    from _trl import TRLStepTimes, _on_text, _StepTimer, _timed_generate
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from vroll.tasks.addition import addition_splits
    from vroll.tasks.synthetic import vowel_share

    c = json.loads(Path(config_path).read_text())
    micro = c["trl_micro"] or c["micro"]
    cuda = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=c["output_dir"], max_steps=c["steps"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=c["prompts"] * c["generations"] // micro, num_generations=c["generations"],
        max_completion_length=c["max_completion"], temperature=1.0, loss_type="dapo", beta=0.0, learning_rate=1e-6,
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=c["vllm_memory"],
        vllm_enable_sleep_mode=c["sleep"] and cuda, vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
        gradient_checkpointing=c["gradient_checkpointing"], bf16=True, use_cpu=not cuda,
        model_init_kwargs={"dtype": getattr(torch, c["dtype"])}, use_liger_kernel=leg == "trl-liger",
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0)
    peft_config = None
    if c["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    import trl

    times = TRLStepTimes(trl_version=trl.__version__)
    timer = _StepTimer(times)
    rows = addition_splits(seed=0, train_size=2000, test_size=0)[0]
    trainer = GRPOTrainer(model=c["model"], reward_funcs=[_on_text(vowel_share)], args=config,
                          train_dataset=Dataset.from_list(rows), callbacks=[timer], peft_config=peft_config)
    _timed_generate(trainer, timer)
    trainer.train()
    Path(c["result"]).write_text(json.dumps(vars(times)))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# what a step trained: tokens, padding, model FLOPs


def prompt_tokens(model: str) -> float:
    """Mean prompt length of the addition task's first rows, as vroll encodes them (TRL's are alike)."""
    from transformers import AutoTokenizer

    from vroll.generation.prompts import encode_prompts
    from vroll.rows import prompt_of
    from vroll.tasks.addition import addition_splits

    rows = addition_splits(seed=0, train_size=256, test_size=0)[0]
    encoded = encode_prompts(AutoTokenizer.from_pretrained(model), [prompt_of(r) for r in rows], 256)
    return sum(len(p.token_ids) for p in encoded) / len(encoded)


def padded_tokens(lengths: list[int], prompt: float, micro: int, padding: str) -> float:
    """Tokens the training forward runs: each micro-batch as wide as its longest row (vroll), or every row
    as wide as the batch's longest (TRL)."""
    if padding == "batch":
        return len(lengths) * (prompt + max(lengths))
    if padding == "packed":
        return len(lengths) * prompt + sum(lengths)
    return sum(len(lengths[i:i + micro]) * (prompt + max(lengths[i:i + micro])) for i in range(0, len(lengths), micro))


def model_flops(lengths: list[int], prompt: float, shape: dict[str, int], checkpointing: bool, lora: bool) -> float:
    """Model FLOPs of one training step on the real tokens.

    Forward: 2 x (decoder matrix parameters) per token, causal attention 2 x L^2 x (heads x head_dim)
    per layer and row, the lm_head 2 x H x V per scored (completion) token. Backward: twice the
    forward (LoRA: once, no weight gradients of frozen matrices); gradient checkpointing: one
    more forward (its recompute).
    """
    H, layers = shape["hidden"], shape["layers"]
    attn = shape["heads"] * shape["head_dim"]
    kv = shape["kv_heads"] * shape["head_dim"]
    per_layer = H * attn * 2 + H * kv * 2 + 3 * H * shape["intermediate"]  # q, o, k, v, gate/up/down
    forward = 0.0
    for c in lengths:
        tokens = prompt + c
        forward += 2 * per_layer * layers * tokens + 2 * layers * attn * tokens**2 + 2 * H * shape["vocab"] * c
    return forward * ((2 if lora else 3) + (1 if checkpointing else 0))


def model_shape(model: str) -> dict[str, int]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model).get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim, "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size}


def derive(leg: dict[str, Any], prompt: float, shape: dict[str, int], args: argparse.Namespace,
           peak: float | None) -> dict[str, Any]:
    """Per-step means of tokens, padding share, tokens/s and MFU from the lengths the leg was given."""
    steps = leg["imposed_lengths"]
    real = sum(len(s) * prompt + sum(s) for s in steps) / len(steps)
    padded = sum(padded_tokens(s, prompt, leg["micro"], leg["padding"]) for s in steps) / len(steps)
    flops = sum(model_flops(s, prompt, shape, args.gradient_checkpointing, args.lora) for s in steps) / len(steps)
    return {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded,
            "tokens_per_s": real / leg["step_s"], "train_tokens_per_s": real / leg["train_s"],
            "model_tflop_per_step": flops / 1e12,
            "train_mfu": flops / (leg["train_s"] * peak * 1e12) if peak else None}


# ---------------------------------------------------------------------------------------------------------------
# report


def report(all_legs: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    legs = [leg for leg in all_legs if "error" not in leg]  # a failed leg (its error) stays in the JSON only
    trl = next((leg for leg in legs if leg["leg"] == "trl"), None)
    today = next((leg for leg in legs if leg["leg"] == "vroll-today"), None)

    def vs(leg: dict[str, Any], key: str) -> float | None:
        return trl[key] / leg[key] if trl and leg.get(key) and trl.get(key) else None

    rows = [[leg["leg"], leg["step_s"], leg["generate_s"], leg["train_s"], leg["peak_cuda_gib"],
             leg["tokens_per_s"], f"{100 * leg['padding_share']:.0f}%",
             None if leg["train_mfu"] is None else f"{100 * leg['train_mfu']:.1f}%",
             vs(leg, "step_s"), vs(leg, "train_s"),
             leg["peak_cuda_gib"] / trl["peak_cuda_gib"] if trl and leg["peak_cuda_gib"] and trl["peak_cuda_gib"]
             else None] for leg in legs]
    print_table(["leg", "s/step", "generate", "train", "peak GiB", "tokens/s", "padding", "train MFU",
                 "step x TRL", "train x TRL", "memory / TRL"], rows,
                title=f"GRPO at user shape: {meta['shape_label']}, mean of steps {meta['warmup'] + 1}..{meta['steps']}")
    data = {"machine": machine_info(), **meta, "legs": all_legs,
            "speedup_vs_trl": {leg["leg"]: vs(leg, "step_s") for leg in legs} if trl else None,
            "train_speedup_vs_trl": {leg["leg"]: vs(leg, "train_s") for leg in legs} if trl else None,
            "train_speedup_vs_vroll_today": {leg["leg"]: today["train_s"] / leg["train_s"] for leg in legs
                                             if leg.get("train_s") and today.get("train_s")} if today else None}
    print(f"\nwrote {write_json(out, data)}")


def merge(paths: list[str], out: str) -> int:
    """One table from the JSON of several calls (one leg each on the GPU machine)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    meta = {k: v for k, v in parts[0].items() if k not in ("machine", "legs", "speedup_vs_trl",
                                                          "train_speedup_vs_trl", "train_speedup_vs_vroll_today")}
    meta["merged_from"] = [{"path": p, "machine": part["machine"]} for p, part in zip(paths, parts, strict=True)]
    report([leg for part in parts for leg in part["legs"]], meta, out)
    return 0


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--legs", default="vroll-today,vroll,trl,trl-liger")
    p.add_argument("--model", help="a model folder (make_model.py); default: build --shape")
    p.add_argument("--shape", default="qwen2.5-1.5b", help="make_model.py shape when --model is not given")
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro", type=int, default=8, help="completions per micro-batch (both sides)")
    p.add_argument("--today-micro", type=int, default=0, help="the vroll-today leg's micro-batch, if not --micro")
    p.add_argument("--token-budget", type=int, default=32768,
                   help="the vroll leg's --max_tokens_per_micro_batch (>= 256 + --max-completion)")
    p.add_argument("--trl-micro", type=int, default=0, help="TRL's micro-batch, if not --micro")
    p.add_argument("--min-completion", type=int, default=256)
    p.add_argument("--max-completion", type=int, default=4096)
    p.add_argument("--skew", type=float, default=3.0, help="lengths min + (max - min) * u^skew; 0: all at max")
    p.add_argument("--length-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the means")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights as loaded for training (bf16 autocast either way); LoRA at 7B: bfloat16")
    p.add_argument("--lora", action="store_true", help="LoRA r=16, alpha 32, all linear layers (both sides)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sleep", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM sleeps (frees its memory) while the trainer trains (GPU only)")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="vLLM's share of the GPU")
    p.add_argument("--vroll-flags", default="", help="more flags for the vroll legs")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    p.add_argument("--out", default=default_out("grpo_user_shape"))
    p.add_argument("--merge", nargs="+", metavar="JSON")
    p.add_argument("--trl-child", nargs=2, metavar=("LEG", "CONFIG"), help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse()
    if args.trl_child:
        return trl_child(*args.trl_child)
    if args.merge:
        return merge(args.merge, args.out)
    tmp = Path(tempfile.mkdtemp(prefix="vroll-bench-user-shape-"))
    model = ensure_model(args, tmp)
    peak, prompt, shape = peak_tflops(args.peak_tflops), prompt_tokens(model), model_shape(model)
    legs = []
    for name in args.legs.split(","):
        try:
            leg = run_vroll(name, args, model, tmp) if name.startswith("vroll") else run_trl(name, args, model, tmp)
        except RuntimeError as e:  # out of memory at the largest lengths is a result: the other legs run on
            legs.append({"leg": name, "error": str(e)[-2000:]})
            print(f"  {name}: FAILED ({str(e).splitlines()[-1][:200]})", flush=True)
            continue
        legs.append(leg | derive(leg, prompt, shape, args, peak))
        print(f"  {name}: {leg['step_s']:.2f} s/step (generate {leg['generate_s']:.2f}, train {leg['train_s']:.2f})",
              flush=True)
    label = (f"{Path(model).name}, {args.prompts}x{args.generations} completions of {args.min_completion}.."
             f"{args.max_completion} tokens (skew {args.skew}), micro {args.micro}, "
             f"vroll budget {args.token_budget} tokens" + (", LoRA" if args.lora else ""))
    meta = {"shape_label": label, "model": model, "model_shape": shape, "mean_prompt_tokens": prompt,
            "peak_tflops": peak, "steps": args.steps, "warmup": args.warmup,
            "config": {k: v for k, v in vars(args).items() if k not in ("merge", "trl_child", "out")}}
    report(legs, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
