"""The online-RL loop shared by GRPO and Online DPO.

One optimizer step, in order:

1. for each of ``gradient_accumulation_steps`` micro-steps:
   a. if this micro-step starts a generation batch: push the weights to the generator
      if they changed since the last push, sample completions for the next prompts,
      score them, and turn them into this process's micro-batches (subclass hook);
   b. forward + backward on this process's next micro-batch (subclass hook);
2. clip gradients, step the optimizer and the scheduler;
3. log metrics; checkpoint every ``save_steps``.

Only the main process talks to a server; the other processes receive its rollout by
broadcast, score their own slice, and all-gather the rewards.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather, gather_object, set_seed
from tqdm.auto import tqdm

from vroll.models import resolve_model
from vroll.rewards import resolve_reward_funcs, score
from vroll.trainer.artifacts import RunArtifacts
from vroll.trainer.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from vroll.trainer.config import TrainConfig
from vroll.trainer.data import PromptSampler, check_prompt_column, load_rows, prompt_of
from vroll.trainer.devices import check_colocate_memory, gpu_uuid, server_conflict
from vroll.trainer.rollout import (
    Generator,
    Rollout,
    SamplingArgs,
    ServerGenerator,
    TransformersGenerator,
    encode_prompts,
)
from vroll.weightsync.sender import WeightSyncConfig

log = logging.getLogger("vroll.trainer")


def load_policy(model: Any, tokenizer: Any, args: TrainConfig, path: str | None = None) -> tuple[Any, Any]:
    """The trainable model and its tokenizer (``path`` overrides, e.g. a checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = path or (model if isinstance(model, str) else None) or args.model_name_or_path
    source = resolve_model(name)
    if model is None or isinstance(model, str) or path:
        dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
        kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source if isinstance(source, str) else model.name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer


class OnlineTrainer:
    """Base class: model, data, generator, optimizer, loop, artifacts and checkpoints."""

    config_class: type[TrainConfig] = TrainConfig  # what ``args`` must be (and its default)

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: TrainConfig | None = None,
                 train_dataset: Any = None, processing_class: Any = None) -> None:
        self.args = args = args or self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}")
        # cpu=True without CUDA: accelerate only sets up multi-process (gloo) CPU runs when told so
        self.accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not torch.cuda.is_available())
        self.validate(self.accelerator.num_processes)
        set_seed(args.seed)
        self.resume_path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        self.rows = self._rows(train_dataset)
        self.reward_funcs = resolve_reward_funcs(reward_funcs if reward_funcs is not None else args.reward_funcs)
        resume_model = str(self.resume_path) if self.resume_path else None
        model, self.tokenizer = load_policy(model, processing_class, args, resume_model)
        self.setup_model(model)
        self.total_steps = self._total_steps()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.scheduler = self._scheduler()
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.sampler = PromptSampler(len(self.rows), args.data_seed or 0)
        self.state = TrainerState()
        self.artifacts = RunArtifacts(args.output_dir, self.is_main, args.report_to, args.run_name, asdict(args))
        self.generator = self._make_generator()
        self.buffer: Any = None
        self._weights_dirty = True
        self.callbacks: list[Callable[[OnlineTrainer, dict[str, float]], None]] = []

    def add_callback(self, callback: Callable[[OnlineTrainer, dict[str, float]], None]) -> None:
        """Call ``callback(trainer, metrics)`` after every optimizer step (evals, probes, early stops)."""
        self.callbacks.append(callback)

    # ------------------------------------------------------------------ hooks

    def validate(self, num_processes: int) -> None:
        """Config checks that need the number of processes."""

    def setup_model(self, model: Any) -> None:
        """Build what the loss needs beside the policy (a reference model, say)."""

    def prompts_per_generation(self) -> int:
        raise NotImplementedError

    def completions_per_prompt(self) -> int:
        raise NotImplementedError

    def make_buffer(self, rows: list[dict], rollout: Rollout, rewards: torch.Tensor,
                    per_func: torch.Tensor, timings: dict[str, float]) -> Any:
        """Turn a scored rollout into this process's micro-batches (``buffer.micro_batches``)."""
        raise NotImplementedError

    def micro_step(self, micro_batch: Any) -> dict[str, float]:
        """Forward + backward on one micro-batch; returns its metrics."""
        raise NotImplementedError

    def micro_steps_per_generation(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ setup

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _rows(self, train_dataset: Any) -> list[dict]:
        args = self.args
        if train_dataset is None:
            rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split,
                             args.dataset_size, args.data_seed or 0)
        else:
            rows = [dict(r) for r in train_dataset]
        check_prompt_column(rows, args.dataset_name if train_dataset is None else "train_dataset")
        return rows

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_step = self.prompts_per_generation() * self.args.gradient_accumulation_steps
        per_step /= self.micro_steps_per_generation()
        return max(1, math.ceil(self.args.num_train_epochs * len(self.rows) / per_step))

    def _scheduler(self) -> Any:
        from transformers import get_scheduler

        warmup = int(self.args.warmup_ratio * self.total_steps)
        return get_scheduler(self.args.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                             num_training_steps=self.total_steps)

    def _make_generator(self) -> Generator | None:
        args = self.args
        if not args.use_vllm:
            policy = self.accelerator.unwrap_model(self.model)
            return TransformersGenerator(policy, self.tokenizer, autocast=args.bf16)
        if args.vllm_mode == "colocate":
            return self._colocate_generator()
        generator = None
        if self.is_main:
            sync = WeightSyncConfig(bucket_mb=args.weight_sync_bucket_mb, host=args.weight_sync_host)
            key = args.vllm_api_key or os.environ.get("VROLL_API_KEY")
            generator = ServerGenerator(args.server_url, key, args.vllm_server_timeout, sync)
        self._check_server_devices(generator)
        return generator

    def _check_server_devices(self, generator: ServerGenerator | None) -> None:
        """Refuse (on every process) a server that shares a GPU with any training process."""
        mine = [gpu_uuid(self.accelerator.device)]
        uuids = gather_object(mine) if self.accelerator.num_processes > 1 else mine
        box = [None if generator is None else server_conflict(uuids, generator.info.gpu_uuids, self.args.server_url)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        if box[0]:
            if generator is not None:
                generator.close()
            raise ValueError(box[0])

    def _colocate_generator(self) -> Generator:
        from vroll.protocol import EngineSpec
        from vroll.trainer.colocate import ColocateGenerator

        args = self.args
        policy = self.accelerator.unwrap_model(self.model)
        source = getattr(getattr(policy, "config", None), "_name_or_path", "") or ""
        if not source:
            raise ValueError("vllm_mode='colocate' builds its engine from the model's folder or Hub name; "
                             "pass the model by name (or save it and pass the folder)")
        check_colocate_memory(self.accelerator.device, args.vllm_gpu_memory_utilization, args.vllm_enable_sleep_mode)
        max_len = args.vllm_max_model_len or (
            args.max_prompt_length + args.max_completion_length if args.max_prompt_length else None)
        spec = EngineSpec(model=str(resolve_model(source)), served_name=source,
                          tensor_parallel_size=args.vllm_tensor_parallel_size, max_model_len=max_len,
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          enforce_eager=args.vllm_enforce_eager, seed=args.seed,
                          kv_cache_memory_gib=args.vllm_kv_cache_memory_gib,
                          enable_sleep_mode=args.vllm_enable_sleep_mode,
                          distributed_executor_backend="external_launcher")
        return ColocateGenerator(spec, args.weight_sync_bucket_mb)

    # ------------------------------------------------------------------ rollout

    def _sync_weights(self) -> float:
        start = time.perf_counter()
        if self.generator is not None:
            self.generator.sync_weights(self.accelerator.unwrap_model(self.model))
        self.accelerator.wait_for_everyone()
        self._weights_dirty = False
        return time.perf_counter() - start

    def _rollout(self, prompt_ids: list[list[int]], sampling: SamplingArgs) -> Rollout:
        """A server: the main process generates for all. Local generators: each its share, then all-gather."""
        n_proc = self.accelerator.num_processes
        if self.generator is None or not self.generator.local:
            box = [self.generator.generate(prompt_ids, sampling) if self.is_main else None]
            if n_proc > 1:
                broadcast_object_list(box, from_process=0)
            return box[0]
        share = math.ceil(len(prompt_ids) / n_proc)
        first = self.accelerator.process_index * share
        mine = self.generator.generate(prompt_ids[first : first + share], sampling, first_index=first)
        return _concat_rollouts(gather_object([mine]) if n_proc > 1 else [mine])

    def _score(self, rows: list[dict], rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of all completions: each process scores its slice, then all-gather."""
        n = self.completions_per_prompt()
        prompts = [prompt_of(r) for r in rows for _ in range(n)]
        cols = {k: [r[k] for r in rows for _ in range(n)] for k in rows[0] if k not in ("prompt", "messages")}
        lo, hi = self.my_slice(len(prompts))
        weights = self.args.reward_weights
        scores = score(self.reward_funcs, weights, prompts[lo:hi], rollout.texts[lo:hi],
                       {k: v[lo:hi] for k, v in cols.items()}, truncated=rollout.truncated[lo:hi])
        per_func, total = scores.per_func, scores.total
        if self.accelerator.num_processes > 1:  # NCCL gathers device tensors only
            device = self.accelerator.device
            per_func, total = gather(per_func.to(device)).cpu(), gather(total.to(device)).cpu()
        return total, per_func

    def my_slice(self, total: int) -> tuple[int, int]:
        """This process's contiguous share of ``total`` items."""
        share = total // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return rank * share, (rank + 1) * share

    def _new_buffer(self, timings: dict[str, float]) -> Any:
        args = self.args
        if self._weights_dirty:
            timings["time/sync_s"] += self._sync_weights()
        rows = [self.rows[i] for i in self.sampler.take(self.prompts_per_generation())]
        prompt_ids = encode_prompts(self.tokenizer, [prompt_of(r) for r in rows], args.max_prompt_length)
        sampling = SamplingArgs(n=self.completions_per_prompt(), max_tokens=args.max_completion_length,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed * 100_003 + self.state.generation)
        rollout = self._rollout(prompt_ids, sampling)
        self.state.generation += 1
        timings["time/generate_s"] += rollout.seconds
        start = time.perf_counter()
        total, per_func = self._score(rows, rollout)
        timings["time/score_s"] += time.perf_counter() - start
        self._log_samples(rows, rollout, per_func)
        return self.make_buffer(rows, rollout, total, per_func, timings)

    def rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor, per_func: torch.Tensor) -> dict[str, float]:
        """Rewards (total and per function), lengths and generation speed of one rollout."""
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
             "completion/mean_length": float(lengths.mean()), "completion/max_length": float(lengths.max()),
             "completion/truncated_frac": sum(rollout.truncated) / len(rollout.truncated),
             "generate/tokens_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
             "weight_version": float(rollout.weight_version)}
        for i, (name, _) in enumerate(self.reward_funcs):
            col = per_func[:, i]
            m[f"reward/{name}/mean"] = float(col.nanmean())
            m[f"reward/{name}/std"] = float(col[~col.isnan()].std()) if (~col.isnan()).sum() > 1 else 0.0
        return m

    def _log_samples(self, rows: list[dict], rollout: Rollout, per_func: torch.Tensor) -> None:
        n, names = self.completions_per_prompt(), [name for name, _ in self.reward_funcs]
        picked = range(0, len(rollout.texts), max(1, len(rollout.texts) // max(1, self.args.num_samples_logged)))
        samples = [{"prompt": prompt_of(rows[i // n]), "completion": rollout.texts[i],
                    "truncated": rollout.truncated[i],
                    "rewards": dict(zip(names, per_func[i].tolist(), strict=True))}
                   for i in list(picked)[: self.args.num_samples_logged]]
        self.artifacts.log_samples(self.state.global_step + 1, samples)

    # ------------------------------------------------------------------ loop

    def _optimizer_step(self) -> dict[str, float]:
        args, start = self.args, time.perf_counter()
        timings: dict[str, float] = defaultdict(float)
        micro_metrics: list[dict[str, float]] = []
        per_gen = self.micro_steps_per_generation()
        for _ in range(args.gradient_accumulation_steps):
            if self.state.micro_step % per_gen == 0:
                self.buffer = self._new_buffer(timings)
            mb = self.buffer.micro_batches[self.state.micro_step % len(self.buffer.micro_batches)]
            t = time.perf_counter()
            micro_metrics.append(self.micro_step(mb))
            timings["time/train_s"] += time.perf_counter() - t
            self.state.micro_step += 1
        t = time.perf_counter()
        grad_norm = self._step_optimizer()
        timings["time/train_s"] += time.perf_counter() - t
        self.state.global_step += 1
        self._weights_dirty = True
        metrics = self._mean_over_processes(_mean_dicts(micro_metrics)) | self.buffer.metrics | dict(timings)
        metrics |= {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                    "time/step_s": time.perf_counter() - start}
        metrics["time/other_s"] = metrics["time/step_s"] - sum(timings.values())
        return metrics

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each process trains on its own share: its loss metrics are averaged over processes."""
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist(), strict=True))

    def _step_optimizer(self) -> float:
        norm = 0.0
        if self.args.max_grad_norm > 0:
            norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train(self) -> dict[str, float]:
        """Run to ``total_steps``; returns the last step's metrics."""
        self._maybe_resume()
        self._weights_dirty = True  # the generator may hold other weights: push before sampling
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not self.is_main,
                   desc=type(self).__name__, dynamic_ncols=True)
        metrics: dict[str, float] = {}
        try:
            while self.state.global_step < self.total_steps:
                metrics = self._optimizer_step()
                self._after_step(metrics, bar)
            self._finish()
        finally:
            bar.close()
            self.artifacts.close()
        return metrics

    def _after_step(self, metrics: dict[str, float], bar: tqdm) -> None:
        step = self.state.global_step
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                        step_s=f"{metrics['time/step_s']:.1f}")
        for callback in self.callbacks:  # first: what a callback adds (eval/accuracy) is logged too
            callback(self, metrics)
        if step % self.args.logging_steps == 0 or step == self.total_steps:
            self.artifacts.log_metrics(step, metrics)
            if self.is_main:
                bar.write(_summary(step, self.total_steps, metrics))
        if self.args.save_steps and step % self.args.save_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def _finish(self) -> None:
        if self._weights_dirty:  # every process: the sync ends with a barrier
            self._sync_weights()  # the server ends up serving the final policy
        self.save_checkpoint()
        if self.args.save_final_model and self.is_main:
            final = Path(self.args.output_dir) / "final"
            self.accelerator.unwrap_model(self.model).save_pretrained(final, safe_serialization=True)
            self.tokenizer.save_pretrained(final)
        if self.is_main:
            path = self.artifacts.plot_rewards()
            log.info("run artifacts in %s (reward curve: %s)", self.args.output_dir, path)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` (main process); every process waits for it."""
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self.state.sampler = self.sampler.state()
        if self.is_main:
            mid_batch = self.state.micro_step % self.micro_steps_per_generation() != 0
            save_checkpoint(path, self.accelerator.unwrap_model(self.model), self.tokenizer, self.optimizer,
                            self.scheduler, self.state, self.args.save_only_model,
                            extra={"buffer": self.buffer if mid_batch else None})
        self.accelerator.wait_for_everyone()
        return path

    def _maybe_resume(self) -> None:
        if self.resume_path is None:
            return
        self.state, extra = load_checkpoint(self.resume_path, self.optimizer, self.scheduler)
        self.sampler.load(self.state.sampler)
        self.buffer = extra.get("buffer")
        self.artifacts.truncate_after(self.state.global_step)
        log.info("resumed from %s at step %d", self.resume_path, self.state.global_step)


def _concat_rollouts(parts: list[Rollout]) -> Rollout:
    first = parts[0]
    return Rollout(
        prompt_ids=[x for p in parts for x in p.prompt_ids],
        completion_ids=[x for p in parts for x in p.completion_ids],
        texts=[x for p in parts for x in p.texts],
        sampling_logps=None if first.sampling_logps is None else [x for p in parts for x in p.sampling_logps],
        truncated=[x for p in parts for x in p.truncated],
        weight_version=first.weight_version,
        seconds=max(p.seconds for p in parts),
    )


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def _summary(step: int, total: int, m: dict[str, float]) -> str:
    rewards = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in sorted(m.items())
                       if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2)
    return (f"step {step}/{total} | reward {m.get('reward/mean', float('nan')):.3f} ({rewards}) | "
            f"loss {m.get('loss', float('nan')):.4f} | len {m.get('completion/mean_length', 0):.1f} | "
            f"{m['time/step_s']:.1f} s/step (gen {m.get('time/generate_s', 0):.1f}, "
            f"score {m.get('time/score_s', 0):.2f}, train {m.get('time/train_s', 0):.1f}, "
            f"sync {m.get('time/sync_s', 0):.2f})")
