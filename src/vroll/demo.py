"""``make demo``: serve the embedded model, train it with GRPO on 2-digit addition, show it learned.

1. start ``vroll serve`` on the embedded SmolLM2-135M-Instruct (CPU, a free loopback port);
2. greedy accuracy on a held-out test split (before);
3. GRPO against that server for a few minutes (weights pushed after every step);
4. greedy accuracy on the same test split (after), with the server now serving the
   trained weights; the run is left in ``runs/demo`` and the model in ``runs/demo/final``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from vroll.client import GenerationClient
from vroll.server.launch import ServerProcess, launch_server
from vroll.tasks.addition import addition_correct, addition_splits


def greedy_accuracy(client: GenerationClient, rows: list[dict]) -> float:
    """Fraction of test problems whose greedy answer is right."""
    out = client.chat([r["prompt"] for r in rows], temperature=0.0, max_tokens=24)
    texts = [r.completions[0].text for r in out.results]
    scores = addition_correct([None] * len(rows), texts, answer=[r["answer"] for r in rows])
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="GRPO optimizer steps")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--test-size", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(args.output_dir)
    print(f"[demo] starting vroll serve (log: {out / 'server.log'})", flush=True)
    flags = ["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "1"]
    server = launch_server(flags, out / "server.log", ready_timeout_s=900)
    try:
        return _run(args, out, server)
    finally:
        server.stop()


def _run(args: argparse.Namespace, out: Path, server: ServerProcess) -> int:
    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.grpo import GRPOTrainer

    client = server.client()
    train, test = addition_splits(seed=0, train_size=2000, test_size=args.test_size)
    before = greedy_accuracy(client, test)
    print(f"[demo] greedy accuracy before training: {before:.1%} on {len(test)} held-out problems", flush=True)
    config = GRPOConfig(
        output_dir=str(out), vllm_server_base_url=server.url, max_steps=args.steps, per_device_train_batch_size=32,
        num_generations=8, learning_rate=2e-5, max_completion_length=24, temperature=1.0, loss_type="dapo",
        # Only correctness is rewarded; the format reward is logged, weight 0. Rewarding a bare
        # number made this model drop its "a + b = c" working and guess (accuracy fell).
        reward_funcs=["addition_correct", "addition_format"], reward_weights=[1.0, 0.0],
        save_steps=0, logging_steps=1, seed=0)
    start = time.perf_counter()
    GRPOTrainer(args=config, train_dataset=train).train()
    after = greedy_accuracy(client, test)
    minutes = (time.perf_counter() - start) / 60
    print(f"[demo] greedy accuracy before: {before:.1%}  after {args.steps} GRPO steps ({minutes:.1f} min): "
          f"{after:.1%}", flush=True)
    print(f"[demo] run in {out}: metrics.jsonl, samples.jsonl, reward_curve.png; model in {out / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
