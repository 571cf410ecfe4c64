"""``OnlineTrainer``: the online-RL loop shared by GRPO, RLOO and Online DPO.

One optimizer step, in order:

1. for each of ``gradient_accumulation_steps`` micro-steps:
   a. if this micro-step starts a generation batch: take the next scored batch from
      :class:`~vroll.generation.rollouts.Rollouts` (which pushes the weights first if they changed,
      generates, scores and samples dynamically) and ``build`` this process's micro-batches from it;
   b. backpropagate ``loss(model, micro_batch)`` on this process's next micro-batch;
2. clip gradients, step the optimizer and the scheduler;
3. log metrics; call the callbacks; checkpoint every ``save_steps``.

An algorithm is a subclass with a config class and two methods, ``build`` and ``loss`` (see
:class:`OnlineTrainer`); how many prompts, completions and micro-steps a generation batch has is
its config's arithmetic. The trainer builds its collaborators from the config (the model:
``vroll.trainer.model``; the generation: ``vroll.trainer.generators``) and keeps the loop, the
optimizer and the checkpoints; the step's seconds go to a :class:`~vroll.generation.clock.Clock`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vroll.batching import process_slice
from vroll.environments import EpisodeInfo
from vroll.generation.async_generation import AsyncState, Generated
from vroll.generation.clock import Clock
from vroll.generation.planning import Planned
from vroll.generation.rollout import Rollout
from vroll.generation.rollouts import ScoredRollout, rollout_metrics
from vroll.protocol import ChatMessage, PromptInput, SamplingSpec
from vroll.rewards import positional_reward_funcs, resolve_reward_funcs
from vroll.rl.advantages import constant_groups
from vroll.rl.losses import LossOutput
from vroll.tasks import default_reward_funcs
from vroll.trainer.bookkeeping.artifacts import RunArtifacts
from vroll.trainer.bookkeeping.checkpoint import (
    TrainerState,
    load_checkpoint,
    load_weights,
    resolve_resume,
    save_checkpoint,
    save_model,
)
from vroll.trainer.bookkeeping.state import from_state, to_state, type_table
from vroll.trainer.bookkeeping.step_metrics import combine, over_processes, pooled_means, summary
from vroll.trainer.callbacks import Callbacks
from vroll.trainer.config import TrainConfig
from vroll.trainer.data import train_rows
from vroll.trainer.generators import RolloutsInputs, make_generator, make_rollouts, start_server
from vroll.trainer.logps import TokenBatch, forward_options
from vroll.trainer.model.distributed import as_float, backward, is_sharded, make_accelerator
from vroll.trainer.model.lora import apply_lora, load_adapters
from vroll.trainer.model.policy import load_policy
from vroll.vision import ImageCodec, PromptImages, VisionBatch

log = logging.getLogger("vroll.trainer")

__all__ = ["GenerationBatch", "OnlineTrainer", "ScoredRollout"]


@dataclass
class GenerationBatch:
    """This process's micro-batches of the current generation batch, and its rollout metrics."""

    micro_batches: list[Any]  # per micro-step: a micro-batch, or a list of them (``OnlineTrainer.build``)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepWork:
    """What an optimizer step's forward passes ran on this process: ``train/micro_batches``, ``train/tokens``
    (prompt and completion tokens) and ``train/padding_share`` (the share of the positions run that are
    padding: 0 for packed rows)."""

    passes: int = 0
    tokens: int = 0
    positions: int = 0

    def add(self, batch: TokenBatch, packed: bool) -> None:
        real = int(batch.attention_mask.sum())
        packed = packed and batch.vision is None  # a vision-language batch runs padded
        self.passes, self.tokens = self.passes + 1, self.tokens + real
        self.positions += real if packed else batch.attention_mask.numel()

    def metrics(self) -> dict[str, float]:
        return {"train/micro_batches": float(self.passes), "train/tokens": float(self.tokens),
                "train/padding_share": 1.0 - self.tokens / self.positions if self.positions else 0.0}


def show_info_lines() -> None:
    """A script that sets up no logging still sees the trainer's INFO lines (which server it trains against,
    resumes, the server's log): the ``vroll`` logger gets a stderr handler, as transformers gives its own
    logger one, unless logging is configured (a root or ``vroll`` handler: then that configuration rules)."""
    lib = logging.getLogger("vroll")
    if logging.getLogger().handlers or lib.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)


class OnlineTrainer:
    """Base class: model, data, generation, optimizer, loop, artifacts and checkpoints.

    An algorithm subclasses it with ``config_class`` (whose batch arithmetic says how many
    prompts, completions and micro-steps a generation batch has), ``build`` and ``loss``;
    optionally ``setup_model`` (a reference model), ``metrics`` (per generation batch),
    ``with_signal`` (which prompts dynamic sampling keeps) and ``uses_sampling_logprobs``.
    ``callbacks`` are vroll callables, called as ``callback(trainer, metrics)`` after every optimizer
    step (``vroll grpo --eval_steps`` adds ``vroll.evaluate.EvalCallback``), or transformers
    ``TrainerCallback``s (``vroll.trainer.callbacks``). ``peft_config`` (TRL's) trains LoRA adapters.
    """

    config_class: type[TrainConfig] = TrainConfig  # what ``args`` must be (and its default)
    # what a checkpoint may hold of a run's pending state (vroll.trainer.bookkeeping.state): the generation types,
    # and an algorithm adds its micro-batch class
    state_types: tuple[type, ...] = (GenerationBatch, TokenBatch, VisionBatch, PromptImages, AsyncState, Generated,
                                     Planned, Rollout, PromptInput, SamplingSpec, EpisodeInfo, ChatMessage)

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: TrainConfig | None = None,
                 train_dataset: Any = None, processing_class: Any = None, callbacks: Sequence[Any] | None = None,
                 peft_config: Any = None) -> None:
        show_info_lines()
        self.args = args = args or self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}")
        args.use_peft = args.use_peft or peft_config is not None  # TRL's peft_config=: LoRA with that config
        self.accelerator: Accelerator = make_accelerator(args)  # DDP, DeepSpeed (--deepspeed) or FSDP2
        args.validate(self.accelerator.num_processes)
        # a server at the default address (two commands, seed 000), else vLLM on the spare GPU (the guide; starting)
        spare = start_server(args, self.accelerator)
        set_seed(args.seed)
        self.resume_path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        self.rows = train_rows(args, train_dataset)
        self.reward_funcs = resolve_reward_funcs(self._reward_specs(reward_funcs))
        self._warn_positional()
        self.total_steps = args.total_steps(len(self.rows), self.accelerator.num_processes)
        self.model, self.tokenizer = self._prepare_policy(model, processing_class, peft_config)
        self.state = TrainerState()
        self.artifacts = RunArtifacts(args.output_dir, self.is_main, args.report_to, args.run_name, args.redacted())
        self.callback_handler = Callbacks(self)
        if spare is not None:
            spare.wait()
        policy = self.accelerator.unwrap_model(self.model)
        self.generator = make_generator(args, self.accelerator, policy, self.tokenizer)
        self.rollouts = make_rollouts(args, RolloutsInputs(
            self.accelerator, self.generator, self.rows, self.tokenizer, self.reward_funcs,
            functools.partial(self.accelerator.unwrap_model, self.model), self.uses_sampling_logprobs(),
            self.total_steps, self.callback_handler.current_state))
        self.generation_batch: GenerationBatch | None = None
        for callback in callbacks or ():
            self.add_callback(callback)
        if args.eval_steps and not self.callback_handler.plain:
            log.warning("eval_steps=%d: held-out evals run as a callback; pass callbacks=vroll.evaluate."
                        "eval_callbacks(args) (the vroll commands do)", args.eval_steps)
        self.callback_handler.event("on_init_end")

    def _reward_specs(self, given: Any) -> Any:
        """The reward functions passed in, else ``--reward_funcs``, else the data's task rewards (recorded in args)."""
        if given is not None:
            return given
        if self.args.reward_funcs is None:
            self.args.reward_funcs = (["environment"] if self.args.environment else  # the episodes' own rewards
                                      default_reward_funcs(self.args.dataset_name, self.rows))
            log.info("reward_funcs not given: %s (the rewards of this data's task)", " ".join(self.args.reward_funcs))
            self.args.check_reward_weights()
        return self.args.reward_funcs

    def _warn_positional(self) -> None:
        """One line per reward function called positionally (``def f(p, c, **kw)``: TRL's keyword call cannot)."""
        columns = [k for k in self.rows[0] if k not in ("prompt", "messages")] + (
            ["env_reward"] if self.args.environment or self.args.tools else [])
        for name in positional_reward_funcs(self.reward_funcs, columns) if self.is_main else []:
            log.warning("reward function %r cannot be called by keyword as TRL calls it (prompts=, completions=, "
                        "...): it is called positionally, f(prompts, completions, **columns); name its first two "
                        "parameters prompts and completions to silence this", name)

    def _prepare_policy(self, model: Any, processing_class: Any, peft_config: Any) -> tuple[Any, Any]:
        """The policy (LoRA, the algorithm's extras, a checkpoint's weights) prepared with its optimizer."""
        args = self.args
        # the initial policy first: a reference model copies it, also when resuming
        model, tokenizer = load_policy(model, processing_class, args)
        model = apply_lora(model, args, self.resume_path, peft_config)  # LoRA (a LoRA checkpoint's own adapters)
        self.forward_options = forward_options(model, args)  # --padding_free, --logps_chunk_tokens as it runs them
        self.setup_model(model)
        if self.resume_path and not args.use_peft and not is_sharded(self.accelerator):
            load_weights(model, self.resume_path)  # (ZeRO/FSDP restore them from sharded/ with the optimizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=self.total_steps,
                                       num_warmup_steps=int(args.warmup_ratio * self.total_steps))
        model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return model, tokenizer

    def add_callback(self, callback: Any) -> None:
        """Call ``callback(trainer, metrics)`` after every optimizer step (evals, probes, early stops); a
        ``transformers.TrainerCallback`` (instance or class) gets its events (``vroll.trainer.callbacks``)."""
        self.callback_handler.add(callback)

    # ------------------------------------------------------------------ the algorithm

    def setup_model(self, model: Any) -> None:
        """Build what the loss needs beside the policy (a reference model, say)."""

    def build(self, scored: ScoredRollout) -> list[Any]:
        """This process's micro-batches of a scored generation batch (each carries its own normalizer), one per
        micro-step, or per micro-step a list of them (token-budget micro-batches: as many lists on every
        process, each as long as the other processes' list for that micro-step)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, micro_batch: Any) -> LossOutput:
        """This micro-batch's share of the step's loss (backpropagated as is) and its metrics."""
        raise NotImplementedError

    def uses_sampling_logprobs(self) -> bool:
        """Whether the loss reads the generator's logprobs (if not, the engine is not asked for them:
        at 512 tokens on an H100 they are ~20% of a colocated generate, docs/performance.md)."""
        return True

    def with_signal(self, scored: ScoredRollout) -> torch.Tensor:
        """(P,) True for each prompt whose completions were scored differently: the prompts that can teach
        something, which ``--dynamic_sampling`` keeps."""
        return ~constant_groups(scored.rewards, self.args.completions_per_prompt())

    def metrics(self, scored: ScoredRollout) -> dict[str, float]:
        """Metrics of a generation batch, logged with each step it feeds."""
        return rollout_metrics(scored)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def my_slice(self, total: int) -> tuple[int, int]:
        """This process's contiguous share of ``total`` items."""
        return process_slice(total, self.accelerator.process_index, self.accelerator.num_processes)

    # ------------------------------------------------------------------ loop

    def _new_generation_batch(self, clock: Clock) -> GenerationBatch:
        scored = self.rollouts.next(clock, self.with_signal)
        self.artifacts.log_samples(self.state.global_step + 1, scored.samples)
        with clock.measure("train"):  # reference/old logps are training compute
            micro_batches = self.build(scored)
        return GenerationBatch(micro_batches, self.metrics(scored) | scored.metrics)

    def _optimizer_step(self) -> dict[str, float]:
        args, clock = self.args, Clock()
        busy = self.rollouts.generator_busy_s()
        losses, micro_metrics, work = 0.0, [], StepWork()
        for i in range(args.gradient_accumulation_steps):
            if self.state.micro_step % args.micro_steps_per_generation() == 0 or self.generation_batch is None:
                self.generation_batch = self._new_generation_batch(clock)
            batches = self.generation_batch.micro_batches
            step = batches[self.state.micro_step % len(batches)]
            loss, step_metrics = self._micro_step(step if isinstance(step, list) else [step], clock, work,
                                                  ends_window=i == args.gradient_accumulation_steps - 1)
            losses += loss
            micro_metrics += step_metrics
            self.state.micro_step += 1
        with clock.measure("train"):
            grad_norm = self._step_optimizer()
        self.state.global_step += 1
        self.rollouts.policy_changed()
        # the loss is summed over the accumulation window (one number per step, however it is split)
        metrics = pooled_means(over_processes({"loss": losses} | work.metrics() | combine(micro_metrics),
                                              self.accelerator))
        metrics |= self.generation_batch.metrics | clock.metrics()
        metrics |= {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "time/step_s": clock.elapsed()}
        # async: the batches were generated during earlier steps, not on this step's clock
        overlapped = clock.seconds("generate") if self.rollouts.async_mode else 0.0
        metrics["time/other_s"] = metrics["time/step_s"] - sum(clock.metrics().values()) + overlapped
        if busy is not None:
            busy = self.rollouts.generator_busy_s() - busy
            metrics["async/generator_idle_frac"] = max(0.0, 1.0 - busy / metrics["time/step_s"])
        return metrics

    def _micro_step(self, micro_batches: list[Any], clock: Clock, work: StepWork,
                    ends_window: bool) -> tuple[float, list[dict]]:
        """Backpropagate one micro-step's micro-batches (none, one, or a token-budget window's share); returns
        their summed loss and their metrics (a dummy's, whose loss is 0 by construction, left out)."""
        loss, metrics = 0.0, []
        for j, micro_batch in enumerate(micro_batches):
            with clock.measure("train"):
                out = self.loss(self.model, micro_batch)
                backward(self.accelerator, out.loss, last=ends_window and j == len(micro_batches) - 1)
            loss += out.loss.item()
            work.add(micro_batch.batch, packed=self.forward_options.packed)
            if not getattr(micro_batch, "dummy", False):
                metrics.append(out.metrics)
        return loss, metrics

    def _step_optimizer(self) -> float:
        norm = 0.0
        if self.args.max_grad_norm > 0:
            norm = as_float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
        """Run to ``total_steps`` (or until a ``TrainerCallback`` stops it); returns the last step's metrics.

        ``resume_from_checkpoint`` (``Trainer.train``'s): a checkpoint folder, or True for the latest in
        ``output_dir``; it takes the place of ``args.resume_from_checkpoint``.
        """
        if resume_from_checkpoint not in (None, False):
            self._resume_from(resume_from_checkpoint)
        self._maybe_resume()
        self.rollouts.policy_changed()  # the generator may hold other weights: push before sampling
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not self.is_main,
                   desc=type(self).__name__, dynamic_ncols=True)
        metrics: dict[str, float] = {}
        handler = self.callback_handler
        try:
            handler.event("on_train_begin")
            while self.state.global_step < self.total_steps and not handler.should_stop():
                handler.event("on_step_begin")
                metrics = self._optimizer_step()
                self._after_step(metrics, bar)
            self._finish()
            handler.event("on_train_end")
        finally:
            bar.close()
            self.rollouts.close()
            self.artifacts.close()
        return metrics

    def _after_step(self, metrics: dict[str, float], bar: tqdm) -> None:
        step = self.state.global_step
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                        step_s=f"{metrics['time/step_s']:.1f}")
        logged = step % self.args.logging_steps == 0 or step == self.total_steps
        self.callback_handler.after_step(metrics, logged)  # first: what a callback adds (eval/accuracy) is logged too
        if logged:
            self.artifacts.log_metrics(step, metrics)
            if self.is_main:
                bar.write(summary(step, self.total_steps, metrics))
        if self.args.save_steps and step % self.args.save_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def _finish(self) -> None:
        self.rollouts.finish()  # the generator serves the final policy; its sync session ends
        self.save_checkpoint()
        if self.args.save_final_model:
            self.save_model(str(Path(self.args.output_dir) / "final"))
        if self.is_main:
            path = self.artifacts.plot_rewards()
            log.info("run artifacts in %s (reward curve: %s)", self.args.output_dir, path)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ checkpoints

    def save_model(self, output_dir: str | None = None) -> Path:
        """The policy as a Hugging Face folder (LoRA: the adapters), with its tokenizer, in ``output_dir``
        (default ``args.output_dir``), as ``Trainer.save_model``. Every process calls it: ZeRO-3 and FSDP2
        gather the weights collectively."""
        path = Path(output_dir or self.args.output_dir)
        save_model(path, self.accelerator, self.model, self.tokenizer)
        if self.is_main and (codec := ImageCodec.for_model(self.accelerator.unwrap_model(self.model))):
            codec.save_pretrained(path)  # a VLM's folder needs its preprocessor_config.json
        self.accelerator.wait_for_everyone()
        return path

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>``; every process takes part (sharded state, its own RNG)."""
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self.state.generation = self.rollouts.generation
        self.state.sampler, ahead = self.rollouts.checkpoint()
        mid_batch = self.state.micro_step % self.args.micro_steps_per_generation() != 0
        types = type_table(self.state_types)
        extra: dict[str, Any] = {"generation_batch": to_state(self.generation_batch if mid_batch else None, types)}
        if ahead is not None:  # async: the batches generated ahead are saved, the sampler stands before them
            extra["async"] = to_state(ahead, types)
        save_checkpoint(path, self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler,
                        self.state, self.args.save_only_model, extra=extra)
        if self.is_main and (codec := ImageCodec.for_model(self.accelerator.unwrap_model(self.model))):
            codec.save_pretrained(path)  # a VLM's folder needs its preprocessor_config.json
        self.accelerator.wait_for_everyone()
        self.callback_handler.event("on_save")
        return path

    def _resume_from(self, checkpoint: str | bool) -> None:
        """``train(resume_from_checkpoint=...)``: the checkpoint's weights into the built policy now (the
        rest, as for ``args.resume_from_checkpoint``, in :meth:`_maybe_resume`)."""
        path = resolve_resume("latest" if checkpoint is True else str(checkpoint), self.args.output_dir)
        assert path is not None
        policy = self.accelerator.unwrap_model(self.model)
        if is_sharded(self.accelerator):
            pass  # ZeRO/FSDP restore the weights (adapters too) from sharded/ with the optimizer
        elif self.args.use_peft:
            load_adapters(policy, path)  # a LoRA checkpoint holds the adapters only
        else:
            load_weights(policy, path)
        self.resume_path = path

    def _maybe_resume(self) -> None:
        if self.resume_path is None:
            return
        self.state, saved = load_checkpoint(self.resume_path, self.accelerator, self.optimizer, self.scheduler)
        extra = {key: from_state(value, type_table(self.state_types)) for key, value in saved.items()}
        self.generation_batch = extra.get("generation_batch")
        self.rollouts.resume(self.state.generation, self.state.sampler, extra.get("async"))
        self.artifacts.truncate_after(self.state.global_step)
        log.info("resumed from %s at step %d", self.resume_path, self.state.global_step)
