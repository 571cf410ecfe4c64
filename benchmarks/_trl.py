"""The baseline: TRL's ``GRPOTrainer`` without vLLM, timed per optimizer step.

Not a benchmark itself. The scripts import it as ``_trl`` (they run as
``python benchmarks/NAME.py``, which puts this folder on ``sys.path``). Needs the
``bench`` extra (``pip install -e .[bench]``, i.e. ``trl>=1.16``).

The config mirrors vroll's GRPO demo on the addition task: one generation per
optimizer step (on-policy), 8 completions per prompt, DAPO loss, no KL term.
Generation is timed by wrapping ``GRPOTrainer._generate`` (prompt tokenization,
``model.generate`` and decoding; reward scoring and log-prob passes excluded).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

RewardFn = Callable[..., list[float]]


@dataclass
class TRLStepTimes:
    """Per optimizer step: wall seconds, seconds in generation, mean (weighted) reward."""

    step_s: list[float] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)
    reward_mean: list[float] = field(default_factory=list)
    trl_version: str = ""


class _StepTimer(TrainerCallback):
    """Records step wall time, the generation time summed inside each step, and the logged reward."""

    def __init__(self, out: TRLStepTimes) -> None:
        self.out = out
        self._start = 0.0
        self._gen = 0.0

    def add_generate(self, seconds: float) -> None:
        self._gen += seconds

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._gen = 0.0
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.out.step_s.append(time.perf_counter() - self._start)
        self.out.generate_s.append(self._gen)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "reward" in logs:
            self.out.reward_mean.append(float(logs["reward"]))


def _completion_text(completion: Any) -> str:
    """The text of a completion: TRL passes ``[{"role": "assistant", "content": ...}]`` for chat prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def _on_text(fn: RewardFn, end_ids: frozenset[int] = frozenset()) -> RewardFn:
    """``fn`` (which reads completions as strings) made to accept TRL's chat completions; keeps its name.

    With ``end_ids`` it also passes vroll's ``truncated`` flags, decided as TRL decides them for
    ``mask_truncated_completions``: a completion whose last id is not an EOS/pad id was cut.
    """

    @functools.wraps(fn)
    def wrapped(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        ids = kwargs.pop("completion_ids", None)
        if end_ids and ids is not None:
            kwargs["truncated"] = [not row or row[-1] not in end_ids for row in ids]
        return fn(prompts, [_completion_text(c) for c in completions], **kwargs)

    return wrapped


def _end_ids(model_path: str) -> frozenset[int]:
    """The ids that end a completion for TRL: every EOS id of the generation config, and pad."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos])
    except OSError:
        pass
    return frozenset(i for i in ids if i is not None)


def _timed_generate(trainer: Any, timer: _StepTimer) -> None:
    """Wrap the trainer's ``_generate`` so each call's duration goes to ``timer``."""
    original = trainer._generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timer.add_generate(time.perf_counter() - start)

    trainer._generate = generate


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _config(output_dir: str, steps: int, prompts_per_step: int, num_generations: int, max_completion_length: int,
            learning_rate: float, temperature: float, loss_type: str, bf16: bool, seed: int,
            colocate: bool = False, mask_truncated_completions: bool = False, is_correction: bool = True,
            reward_weights: tuple[float, ...] = (1.0, 0.0)) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # generation_batch_size = batch size: one generation per optimizer step
        num_iterations=1,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=temperature,
        loss_type=loss_type,
        mask_truncated_completions=mask_truncated_completions,
        beta=0.0,
        learning_rate=learning_rate,
        reward_weights=list(reward_weights),
        use_vllm=colocate,  # colocate: TRL's in-process vLLM engine (GPU runs)
        **({"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
            "vllm_importance_sampling_correction": is_correction} if colocate else {}),
        bf16=bf16,
        use_cpu=not _cuda(),
        lr_scheduler_type="constant",  # as vroll's default
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
    )


def run_trl_grpo(model_path: str, rows: list[dict], steps: int, *, prompts_per_step: int = 4,
                 num_generations: int = 8, max_completion_length: int = 24, learning_rate: float = 2e-5,
                 temperature: float = 1.0, loss_type: str = "dapo", bf16: bool = True, seed: int = 0,
                 output_dir: str, colocate: bool = False, mask_truncated_completions: bool = False,
                 is_correction: bool = True, save_to: str | None = None, reward: str = "addition") -> TRLStepTimes:
    """Train ``steps`` GRPO steps with TRL on ``rows`` (the addition task) and time each step.

    With ``mask_truncated_completions`` the correctness reward also scores cut completions 0 (as
    vroll's trainer tells it); ``save_to`` saves the trained model and tokenizer there. ``reward="vowels"``:
    ``vowel_share`` alone (speed runs on random weights, where the addition reward is always 0).
    """
    import trl
    from datasets import Dataset
    from trl import GRPOTrainer

    from vroll.tasks.addition import addition_correct, addition_format
    from vroll.tasks.synthetic import vowel_share

    if reward == "vowels":
        funcs, weights = [_on_text(vowel_share)], (1.0,)
    else:
        end_ids = _end_ids(str(model_path)) if mask_truncated_completions else frozenset()
        funcs, weights = [_on_text(addition_correct, end_ids), _on_text(addition_format)], (1.0, 0.0)
    args = _config(output_dir, steps, prompts_per_step, num_generations, max_completion_length,
                   learning_rate, temperature, loss_type, bf16, seed, colocate, mask_truncated_completions,
                   is_correction, weights)
    out = TRLStepTimes(trl_version=trl.__version__)
    timer = _StepTimer(out)
    trainer = GRPOTrainer(
        model=str(model_path),
        reward_funcs=funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        callbacks=[timer],
    )
    _timed_generate(trainer, timer)
    trainer.train()
    if save_to:
        trainer.save_model(save_to)
        trainer.processing_class.save_pretrained(save_to)
    return out
