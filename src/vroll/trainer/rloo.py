"""``RLOOTrainer``: REINFORCE Leave-One-Out, the GRPO loop with another baseline.

Each completion's advantage is its reward minus the mean reward of the *other*
completions of its prompt (an unbiased baseline, no std scaling); everything else
(clipped objective, importance-sampling correction, KL to a reference when ``beta`` > 0)
is GRPO's. The whole algorithm is this file: a config and one method.

    trainer = RLOOTrainer(model="smollm2-135m", reward_funcs=["addition_correct"],
                          args=RLOOConfig(output_dir="runs/rloo", max_steps=50))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vroll.flags import field
from vroll.rl.advantages import leave_one_out_advantages
from vroll.trainer.config import GRPOConfig
from vroll.trainer.grpo import GRPOTrainer


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO: ``num_generations`` completions per prompt, leave-one-out baseline (``scale_rewards`` unused)."""

    output_dir: str = field("runs/rloo", help="where metrics, samples, plots and checkpoints go")


class RLOOTrainer(GRPOTrainer):
    """GRPO's loop and loss with leave-one-out advantages."""

    args: RLOOConfig
    config_class = RLOOConfig

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return leave_one_out_advantages(rewards, self.args.num_generations)
