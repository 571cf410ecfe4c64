"""``vroll grpo`` and ``vroll online-dpo``: flags (or ``--config x.yaml``) to a trained model."""

from __future__ import annotations

import logging
import sys


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main_grpo(argv: list[str]) -> int:
    from vroll.configs import parse_config
    from vroll.trainer.config import GRPOConfig

    cfg = parse_config(GRPOConfig, argv, "vroll grpo", "Train a policy with GRPO against a vroll server.")
    _setup_logging()
    from vroll.trainer.grpo import GRPOTrainer

    return _run(lambda: GRPOTrainer(args=cfg))


def main_online_dpo(argv: list[str]) -> int:
    from vroll.configs import parse_config
    from vroll.trainer.config import OnlineDPOConfig

    cfg = parse_config(OnlineDPOConfig, argv, "vroll online-dpo", "Train a policy with Online DPO.")
    _setup_logging()
    from vroll.trainer.online_dpo import OnlineDPOTrainer

    return _run(lambda: OnlineDPOTrainer(args=cfg))


def _run(make) -> int:  # noqa: ANN001
    from vroll.client import ServerError
    from vroll.rewards import RewardFunctionError
    from vroll.weightsync.sender import WeightSyncError

    try:
        make().train()
    except (ValueError, ServerError, RewardFunctionError, WeightSyncError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
