"""ZeRO-3 at world size 1 on one GPU: a 3B-shaped vision-language model, colocate mode.

Legs (each its own process, so peak memory is its own): ``zero3`` (configs/zero3.json) and
``zero3-offload`` (configs/zero3_offload.json: parameters and optimizer state on the CPU,
vroll's AdamW stepping there). Each runs a few GRPO steps of ``vroll grpo --vllm_mode
colocate --deepspeed ...`` through the Python API, with a callback that records the peak
GPU memory torch saw (allocated and reserved) after every step, while a thread samples
the device's used memory through NVML (what nvidia-smi shows: vLLM's share included).
Writes one JSON with seconds per step (mean after the first), peaks and the config.

    python benchmarks/gpu/zero3_vlm.py --out $OUT/zero3_vlm.json               # builds the model
    python benchmarks/gpu/zero3_vlm.py --model /tmp/vlm3b --legs zero3 --steps 3

The model is ``vroll.testing.build_tiny_vlm(folder, shape="3b")`` (random weights of
the Qwen2.5-VL-3B shape); ``--model`` takes any folder instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"zero3": REPO / "configs/zero3.json", "zero3-offload": REPO / "configs/zero3_offload.json"}


def build_model(folder: Path) -> str:
    """The 3B-shaped VLM (``vroll.testing.build_tiny_vlm``), built once into ``folder``."""
    if (folder / "config.json").exists():
        return str(folder)
    from vroll.testing import build_tiny_vlm

    return str(build_tiny_vlm(folder, shape="3b"))


def rec_data(folder: Path) -> Path:
    """Synthetic referring-expression data (448 px images), made once; the YAML list for --dataset_name."""
    from vroll.tasks.rec import make_synthetic_rec

    yaml_path = folder / "rec.yaml"
    return yaml_path if yaml_path.exists() else make_synthetic_rec(folder, n=64, seed=0, size=448)


class NvmlPeak:
    """Peak used memory of GPU 0 (all processes), sampled every ``period_s`` in a thread."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.peak = 0
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.is_set():
            self.peak = max(self.peak, pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            time.sleep(self.period_s)

    def __enter__(self) -> NvmlPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_leg(args: argparse.Namespace) -> dict[str, Any]:
    """One leg in this process: train ``--steps`` steps, return timings and peaks."""
    import torch

    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.grpo import GRPOTrainer

    rec = args.dataset_name == "rec"
    dataset = str(rec_data(Path(args.run_dir).parent / "rec")) if rec else args.dataset_name
    rewards = ["rec_iou", "rec_format"] if rec else ["addition_correct", "addition_format"]
    cfg = GRPOConfig(model_name_or_path=args.model, deepspeed=str(CONFIGS[args.leg]), vllm_mode="colocate",
                     vllm_gpu_memory_utilization=args.gpu_memory_utilization, vllm_enable_sleep_mode=True,
                     dataset_name=dataset, image_root=str(Path(dataset).parent) if rec else None,
                     reward_funcs=rewards, max_steps=args.steps,
                     per_device_train_batch_size=args.batch,
                     num_generations=args.batch, max_completion_length=args.max_completion_length,
                     max_prompt_length=256, torch_dtype="bfloat16", bf16=True, gradient_checkpointing=True,
                     save_final_model=False, save_only_model=True, output_dir=args.run_dir, report_to=["none"])
    steps: list[dict[str, float]] = []

    def record(trainer: Any, metrics: dict[str, float]) -> None:
        steps.append({"step_s": metrics["time/step_s"], "generate_s": metrics.get("time/generate_s", 0.0),
                      "train_s": metrics.get("time/train_s", 0.0), "sync_s": metrics.get("time/sync_s", 0.0),
                      "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30})

    with NvmlPeak() as nvml:
        trainer = GRPOTrainer(args=cfg)
        trainer.add_callback(record)
        trainer.train()
    later = steps[1:] or steps
    return {"leg": args.leg, "steps": steps, "mean_step_s_after_first": sum(s["step_s"] for s in later) / len(later),
            "peak_allocated_gib": max(s["max_allocated_gib"] for s in steps),
            "peak_reserved_gib": max(s["max_reserved_gib"] for s in steps),
            "peak_device_used_gib": nvml.peak / 2**30, "gpu": torch.cuda.get_device_name(0),
            "config": {k: getattr(cfg, k) for k in ("per_device_train_batch_size", "num_generations",
                                                      "max_completion_length", "vllm_gpu_memory_utilization",
                                                      "gradient_checkpointing", "dataset_name")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--legs", default="zero3,zero3-offload", help="comma-separated: zero3, zero3-offload")
    p.add_argument("--leg", default=None, help=argparse.SUPPRESS)  # one leg, in a child process
    p.add_argument("--model", default=None, help="model folder (default: build the 3B-shaped VLM in /tmp/vlm3b)")
    p.add_argument("--dataset_name", default="rec", help="'rec' (synthetic referring expressions) or 'addition'")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="completions per step (= num_generations: one prompt)")
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--gpu_memory_utilization", type=float, default=0.3)
    p.add_argument("--run_dir", default="/tmp/zero3-vlm-run")
    p.add_argument("--out", default="zero3_vlm.json")
    args = p.parse_args()
    if args.leg:  # child: print the leg's result as the last line
        print("RESULT " + json.dumps(run_leg(args)), flush=True)
        return
    args.model = args.model or build_model(Path("/tmp/vlm3b"))
    results = []
    for leg in args.legs.split(","):
        cmd = [sys.executable, __file__, "--leg", leg, "--model", args.model, "--dataset_name", args.dataset_name,
               "--steps", str(args.steps), "--batch", str(args.batch), "--run_dir", f"{args.run_dir}-{leg}",
               "--max_completion_length", str(args.max_completion_length),
               "--gpu_memory_utilization", str(args.gpu_memory_utilization)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"leg": leg, "error": proc.stderr[-3000:]}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "legs": results}, indent=2))


if __name__ == "__main__":
    main()
