"""The ``vroll`` command: one entry point, one subcommand per job.

    vroll serve       a vLLM generation server (alias: vroll vllm-serve)
    vroll grpo        GRPO training against a server (or colocated / plain generate)
    vroll online-dpo  Online DPO training
    vroll rloo        RLOO training
    vroll eval        strict accuracy of a model on a built-in task

Each subcommand parses its own typed config (flags in dash or underscore spelling,
plus ``--config file.yaml``), so ``vroll serve --help`` lists exactly its flags.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

USAGE = """usage: vroll <command> [flags]

commands:
  serve, vllm-serve   run the vLLM generation server (D replicas x T devices, one HTTP API)
  grpo                train with GRPO
  online-dpo          train with Online DPO
  rloo                train with RLOO (GRPO's loop, leave-one-out baseline)
  eval                strict accuracy of a model on a built-in task (vroll.evaluate)

'vroll <command> --help' lists a command's flags."""


def _serve(argv: list[str]) -> int:
    from vroll.flags import parse_config
    from vroll.server.config import ServeConfig
    from vroll.server.main import serve

    cfg = parse_config(ServeConfig, argv, "vroll serve", "Serve a model with vLLM for online RL.")
    return serve(cfg)


def _grpo(argv: list[str]) -> int:
    from vroll.flags import parse_config
    from vroll.trainer.config import GRPOConfig

    cfg = parse_config(GRPOConfig, argv, "vroll grpo", "Train a policy with GRPO against a vroll server.")
    _setup_logging()
    from vroll.trainer.grpo import GRPOTrainer

    return _train(lambda: GRPOTrainer(args=cfg, callbacks=_callbacks(cfg)))


def _online_dpo(argv: list[str]) -> int:
    from vroll.flags import parse_config
    from vroll.trainer.config import OnlineDPOConfig

    cfg = parse_config(OnlineDPOConfig, argv, "vroll online-dpo", "Train a policy with Online DPO.")
    _setup_logging()
    from vroll.trainer.online_dpo import OnlineDPOTrainer

    return _train(lambda: OnlineDPOTrainer(args=cfg, callbacks=_callbacks(cfg)))


def _rloo(argv: list[str]) -> int:
    from vroll.flags import parse_config
    from vroll.trainer.rloo import RLOOConfig

    cfg = parse_config(RLOOConfig, argv, "vroll rloo", "Train a policy with RLOO against a vroll server.")
    _setup_logging()
    from vroll.trainer.rloo import RLOOTrainer

    return _train(lambda: RLOOTrainer(args=cfg, callbacks=_callbacks(cfg)))


def _callbacks(cfg: Any) -> list[Callable[..., None]]:
    """The trainer's callbacks the flags ask for: ``--eval_steps`` (held-out accuracy every N steps)."""
    from vroll.evaluate import eval_callbacks

    return list(eval_callbacks(cfg))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _train(make: Callable[[], Any]) -> int:
    """Build a trainer and train; errors the user can fix print one line and exit 1."""
    from vroll.client import ServerError
    from vroll.rewards import RewardFunctionError
    from vroll.weightsync.sender import WeightSyncError

    try:
        make().train()
    except (ValueError, ServerError, RewardFunctionError, WeightSyncError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _eval(argv: list[str]) -> int:
    from vroll.evaluate import main as eval_main

    return eval_main(argv)


def commands() -> dict[str, Callable[[list[str]], int]]:
    """Subcommand name -> handler."""
    return {"serve": _serve, "vllm-serve": _serve, "vllm_serve": _serve,
            "grpo": _grpo, "online-dpo": _online_dpo, "online_dpo": _online_dpo,
            "rloo": _rloo, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vroll`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0
    handler = commands().get(argv[0])
    if handler is None:
        print(f"vroll: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
