"""Seconds per multimodal GRPO step on one GPU: vroll colocate against TRL's GRPOTrainer colocate.

The same random-weight Qwen2.5-VL-3B-shaped model (``vroll.testing.build_tiny_vlm(shape="3b")``,
Qwen2.5-VL-3B-Instruct's layer shapes with the embedded tokenizer), the same synthetic REC data
(``vroll.tasks.rec.make_synthetic_rec``: one ``--image-size`` image per prompt), the same batch
(``--prompts`` x ``--num-generations`` completions per optimizer step, one generation per step,
micro-batches of ``--micro-batch`` completions), ``--max-completion-length`` tokens (a random model
never stops early), bf16 weights with the vision tower frozen and gradient checkpointing on both
sides, vLLM colocated in the training process with the same memory share and context length.
Each leg runs in its own process (a colocated engine keeps its GPU memory until exit); means leave
out the first ``--warmup`` steps. Results go to ``--out`` (legs run later are merged into it).

    python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer     # on the CPU machine, once
    python benchmarks/gpu/vlm_step.py --legs vroll,trl --out $OUT/vlm_step_gpu.json
    python benchmarks/gpu/vlm_step.py --legs trl --out $OUT/vlm_step_gpu.json      # one leg per call

Needs vLLM (GPU) and TRL >= 1.16 (``pip install --no-deps trl``); see ``benchmarks/gpu/run_vlm.sh``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "src"), str(REPO / "benchmarks")]  # vroll, and _trl / _common beside grpo_step.py

LEGS = ("vroll", "trl")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--legs", default="vroll,trl", help="comma-separated: vroll (colocate), trl (colocate)")
    p.add_argument("--out", default="vlm_step_gpu.json")
    p.add_argument("--model", default="/tmp/vroll-gpu-model/qwen2.5-vl-3b", help="built here when missing")
    p.add_argument("--tokenizer", default=str(REPO / ".tokenizer"), help="the exported embedded tokenizer")
    p.add_argument("--data", default="/tmp/vroll-vlm-rec", help="synthetic REC data, made here when missing")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--image-size", type=int, default=448, help="pixels a side (448: 256 image tokens)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward")
    p.add_argument("--max-completion-length", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024, help="the engines' context")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--leg", choices=LEGS, help=argparse.SUPPRESS)  # internal: run one leg in this process
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folder and the REC YAML, built once (the image processor capped at the data's image size)."""
    from vroll.tasks.rec import make_synthetic_rec
    from vroll.testing import build_tiny_vlm

    model = Path(args.model)
    if not (model / "config.json").exists():
        start = time.perf_counter()
        build_tiny_vlm(model, family="qwen2_5_vl", shape="3b", tokenizer=args.tokenizer)
        print(f"built {model} in {time.perf_counter() - start:.0f} s", flush=True)
    # Both engines profile memory with the largest image the processor allows (12.8M pixels by
    # default, 16k tokens: more than the context): cap it at the benchmark's images, for both sides.
    pre_path = model / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pixels = args.image_size**2
    pre.update(min_pixels=min(pre["min_pixels"], pixels), max_pixels=pixels,
               size={"shortest_edge": min(pre["min_pixels"], pixels), "longest_edge": pixels})
    pre_path.write_text(json.dumps(pre, indent=2) + "\n")
    data = Path(args.data) / f"{args.image_size}px"
    yaml_path = data / "rec.yaml"
    if not yaml_path.exists():
        make_synthetic_rec(data, n=args.rows, seed=0, size=args.image_size)
    return model, yaml_path


def _mean(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return sum(kept) / len(kept)


def run_vroll(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    """``vroll grpo --vllm_mode colocate``, timed from its metrics.jsonl."""
    flags = {"model_name_or_path": model, "dataset_name": data, "image_root": data.parent, "output_dir": out,
             "vllm_mode": "colocate", "vllm_gpu_memory_utilization": args.gpu_memory_utilization,
             "vllm_max_model_len": args.max_model_len, "max_steps": args.steps,
             "per_device_train_batch_size": args.micro_batch,
             "gradient_accumulation_steps": args.prompts * args.num_generations // args.micro_batch,
             "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
             "learning_rate": args.learning_rate, "loss_type": "dapo",
             "beta": 0.0, "temperature": 1.0, "torch_dtype": "bfloat16", "bf16": True, "gradient_checkpointing": True,
             "freeze_vision_tower": True, "lr_scheduler_type": "constant", "seed": 0, "save_final_model": False,
             "save_only_model": True}
    cmd = [sys.executable, "-m", "vroll", "grpo", *[x for k, v in flags.items() for x in (f"--{k}", str(v))],
           "--reward_funcs", "rec_iou", "rec_format", "--reward_weights", "1.0", "0.0"]
    print("vroll:", " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vroll leg failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": _mean([r["time/step_s"] for r in rows], args.warmup),
            "generate_s": _mean([r["time/generate_s"] for r in rows], args.warmup),
            "train_s": _mean([r["time/train_s"] for r in rows], args.warmup),
            "sync_s": _mean([r["time/sync_s"] for r in rows], args.warmup),
            "step_s_each": [r["time/step_s"] for r in rows], "steps": len(rows),
            "completion_mean_length": _mean([r["completion/mean_length"] for r in rows], 0)}


def _trl_model(model: Path) -> tuple[Any, Any]:
    """TRL's policy (bf16, vision tower frozen, as vroll's) and processor."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    policy = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.bfloat16)
    for p in policy.model.visual.parameters():
        p.requires_grad_(False)
    try:
        processor = AutoProcessor.from_pretrained(model, padding_side="left")
    except ImportError:  # no torchvision: transformers cannot build the video processor; images need none
        from vroll.engine.qwen_vl_cpu import ImageOnlyQwen2_5_VLProcessor

        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(model, padding_side="left")
    return policy, processor


def _image_token_id(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["image_token_id"])


def _trl_rows(data: Path) -> list[dict[str, Any]]:
    """The same rows and prompts vroll trains on (the REC question template), with PIL images."""
    from vroll.rows import images_of
    from vroll.trainer.data import load_rows, prepare_rows

    rows = prepare_rows(load_rows(str(data), None, "train", 0, 0), str(data), str(data.parent))
    return [{"prompt": r["prompt"], "image": images_of(r)[0], "solution": r["solution"]} for r in rows]


def run_trl(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    """TRL's ``GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"``, timed by a callback."""
    import torch
    import trl
    from _trl import TRLStepTimes, _on_text, _StepTimer, _timed_generate
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from vroll.tasks.rec import rec_format, rec_iou

    cuda = torch.cuda.is_available()  # (CPU: only to check this script)
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts * args.num_generations // args.micro_batch,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate, loss_type="dapo", beta=0.0, temperature=1.0, reward_weights=[1.0, 0.0],
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_max_model_length=args.max_model_len, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True,
        # a random model samples the image placeholder now and then (about 1 in 49k tokens), which TRL's
        # training forward would take for an image slot and fail on; vroll masks such completions instead
        generation_kwargs={"logit_bias": {_image_token_id(model): -100.0}},
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0)
    policy, processor = _trl_model(model)
    times = TRLStepTimes(trl_version=trl.__version__)
    timer = _StepTimer(times)
    trainer = GRPOTrainer(model=policy, reward_funcs=[_on_text(rec_iou), _on_text(rec_format)], args=config,
                          train_dataset=Dataset.from_list(_trl_rows(data)), processing_class=processor,
                          callbacks=[timer])
    _timed_generate(trainer, timer)
    trainer.train()
    return {"step_s": _mean(times.step_s, args.warmup), "generate_s": _mean(times.generate_s, args.warmup),
            "step_s_each": times.step_s, "steps": len(times.step_s), "trl_version": times.trl_version}


def _run_leg(args: argparse.Namespace) -> None:
    """Internal: one leg in this process; its result as JSON on the last stdout line."""
    import tempfile

    model, data = Path(args.model), Path(args.data) / f"{args.image_size}px" / "rec.yaml"
    with tempfile.TemporaryDirectory(prefix=f"vlm-{args.leg}-") as tmp:
        result = (run_vroll if args.leg == "vroll" else run_trl)(args, model, data, Path(tmp))
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.leg:
        _run_leg(args)
        return 0
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    if not set(legs) <= set(LEGS):
        raise SystemExit(f"--legs: unknown leg(s) {sorted(set(legs) - set(LEGS))}; known: {', '.join(LEGS)}")
    prepare(args)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"legs": {}}
    report["config"] = {k: v for k, v in vars(args).items() if k not in ("legs", "out", "leg")}
    for leg in legs:
        argv_leg = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--leg", leg]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *argv_leg], capture_output=True, text=True)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{leg} leg failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", flush=True)
            report["legs"][leg] = {"error": proc.stderr[-2000:]}
            continue
        report["legs"][leg] = json.loads(line[len("RESULT "):]) | {"wall_s": time.perf_counter() - start}
        print(f"{leg}: {report['legs'][leg]['step_s']:.2f} s/step", flush=True)
    ok = {k: v for k, v in report["legs"].items() if "step_s" in v}
    if {"vroll", "trl"} <= set(ok):
        report["trl_over_vroll"] = ok["trl"]["step_s"] / ok["vroll"]["step_s"]
        print(f"TRL / vroll seconds per step: {report['trl_over_vroll']:.2f}x (goal: >= 1.3x)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if len(ok) == len(report["legs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
