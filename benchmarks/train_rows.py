"""GRPO's train phase with and without the rows that have no gradient, by share of zero-variance groups.

Late in a run most groups score every completion alike (the demo: 50-100% of groups from step ~50
on), and such a group's advantages are exactly 0: its rows add nothing to the loss or the gradient.
``GRPOTrainer.build`` leaves them out of the training forward (``rows_with_gradient``). This script
times the train phase (``build`` + every micro-batch's loss and backward) on the demo's batch
(4 prompts x 8 completions of the addition task, the embedded SmolLM2-135M, bf16 autocast on
float32 weights, dapo) with 0..4 of the 4 groups constant, each leg twice in one process: as
built, and with every row run (the code before the change, by replacing ``rows_with_gradient``).
The gradients of the two are compared too: in float32 they agree to ~1e-5; under bf16 autocast
each is itself ~18% from the float32 gradient on this batch (replies a token apart with opposite
advantages cancel, so bf16's rounding is large next to the sum), and the two differ by about that
noise. Prints a table, writes JSON.

    python benchmarks/train_rows.py              # on the GPU where one is visible; CPU: ~2 minutes
    python benchmarks/train_rows.py --no-bf16    # float32: the gradients' agreement without bf16 noise
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from _common import default_out, machine_info, print_table, write_json

from vroll.generation.prompts import encode_prompts
from vroll.generation.rollout import Rollout
from vroll.rows import prompt_of
from vroll.tasks.addition import addition_splits
from vroll.trainer import grpo
from vroll.trainer.base import ScoredRollout
from vroll.trainer.config import GRPOConfig

PROMPTS, GENERATIONS = 4, 8


def _rollout(tokenizer: Any, rows: list[dict]) -> Rollout:
    """Replies like the demo's late ones: ``a + b = c`` and EOS (8-12 tokens)."""
    prompts = encode_prompts(tokenizer, [prompt_of(r) for r in rows], 256)
    comps, texts = [], []
    for i in range(PROMPTS * GENERATIONS):
        answer = int(rows[i // GENERATIONS]["answer"])
        text = f"{answer - 17} + 17 = {answer + i % 3}"
        comps.append(tokenizer(text).input_ids + [tokenizer.eos_token_id])
        texts.append(text)
    return Rollout([prompts[i // GENERATIONS].token_ids for i in range(len(comps))], comps,
                   [[1] * len(c) for c in comps], texts, [[-0.5] * len(c) for c in comps],
                   [False] * len(comps), [1] * len(comps), 0.0)


def _rewards(constant_groups: int) -> torch.Tensor:
    """The first ``constant_groups`` groups all right; the others half right."""
    groups = [[1.0] * GENERATIONS if g < constant_groups else [float(j % 2) for j in range(GENERATIONS)]
              for g in range(PROMPTS)]
    return torch.tensor(groups).flatten()


def _train_phase(trainer: grpo.GRPOTrainer, scored: ScoredRollout) -> tuple[float, torch.Tensor, int]:
    """Seconds of build + losses + backwards, the accumulated gradient, and the rows run."""
    trainer.model.zero_grad()
    start = time.perf_counter()
    mbs = trainer.build(scored)
    for mb in mbs:
        trainer.loss(trainer.model, mb).loss.backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return seconds, grad, sum(len(mb.batch) for mb in mbs)


def _leg(trainer: grpo.GRPOTrainer, scored: ScoredRollout, repeats: int) -> dict[str, Any]:
    _train_phase(trainer, scored)  # warm-up
    runs = [_train_phase(trainer, scored) for _ in range(repeats)]
    return {"seconds": statistics.median(r[0] for r in runs), "grad": runs[-1][1], "rows": runs[-1][2]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (the demo's)")
    p.add_argument("--out", default=default_out("train_rows"))
    args = p.parse_args(argv)
    rows = addition_splits(seed=0, train_size=PROMPTS, test_size=0)[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, use_vllm=False, per_device_train_batch_size=PROMPTS * GENERATIONS,
                         num_generations=GENERATIONS, max_completion_length=24, loss_type="dapo",
                         mask_truncated_completions=True, seed=0, save_final_model=False, bf16=args.bf16)
        trainer = grpo.GRPOTrainer(args=cfg, train_dataset=rows)
        rollout = _rollout(trainer.tokenizer, rows)
        every_row = lambda adv, mask, beta: torch.ones_like(adv, dtype=torch.bool)  # noqa: E731
        built = grpo.rows_with_gradient
        results = []
        for constant in range(PROMPTS + 1):
            rewards = _rewards(constant)
            scored = ScoredRollout(rows, rollout, rewards, rewards[:, None])
            grpo.rows_with_gradient = every_row
            before = _leg(trainer, scored, args.repeats)
            grpo.rows_with_gradient = built
            after = _leg(trainer, scored, args.repeats)
            gap = float((after["grad"] - before["grad"]).norm() / before["grad"].norm().clamp(min=1e-30))
            results.append({"constant_groups": constant, "rows_before": before["rows"], "rows_after": after["rows"],
                            "before_s": before["seconds"], "after_s": after["seconds"],
                            "speedup": before["seconds"] / after["seconds"], "grad_rel_diff": gap})
    print_table(["constant groups", "rows run", "train s, every row", "train s, rows with gradient", "speedup",
                 "grad rel. diff"],
                [[f"{r['constant_groups']}/{PROMPTS}", f"{r['rows_before']} -> {r['rows_after']}", r["before_s"],
                  r["after_s"], f"{r['speedup']:.2f}x", f"{r['grad_rel_diff']:.1e}"] for r in results],
                title=f"GRPO train phase, {PROMPTS} x {GENERATIONS} completions, {'bf16' if args.bf16 else 'float32'}")
    write_json(args.out, {"machine": machine_info(), "device": str(trainer.accelerator.device), "bf16": args.bf16,
                          "repeats": args.repeats, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
