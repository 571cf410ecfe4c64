"""The online-RL loop shared by GRPO and Online DPO.

One optimizer step, in order:

1. for each of ``gradient_accumulation_steps`` micro-steps:
   a. if this micro-step starts a generation batch: push the weights to the generator
      if they changed since the last push, sample completions for the next prompts,
      score them, and ``build`` this process's micro-batches from the scored rollout;
   b. backpropagate ``loss(model, micro_batch)`` on this process's next micro-batch;
2. clip gradients, step the optimizer and the scheduler;
3. log metrics; checkpoint every ``save_steps``.

An algorithm is a subclass with a config class and two methods, ``build`` and ``loss``
(see :class:`OnlineTrainer`); the base times them, keeps the micro-batches, and owns the
rest. How many prompts, completions and micro-steps a generation has is the config's
arithmetic. Only the main process talks to a server; the other processes receive its
rollout by broadcast, score their own slice, and all-gather the rewards.

With ``async_generation`` (server mode), step 1a takes a batch generated ahead while the
previous steps trained, and the push waits for the generator to finish what it was given;
``vroll.trainer.async_generation`` has the ordering.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather, gather_object, set_seed
from tqdm.auto import tqdm

from vroll.models import resolve_model
from vroll.protocol import SamplingSpec
from vroll.rewards import positional_reward_funcs, resolve_reward_funcs, reward_completions, score
from vroll.rl.advantages import constant_groups
from vroll.rl.losses import LossOutput
from vroll.tasks import default_reward_funcs
from vroll.trainer.artifacts import RunArtifacts
from vroll.trainer.async_generation import AsyncRollouts, AsyncState, Planned, Taken, async_mode, schedule_for
from vroll.trainer.callbacks import Callbacks
from vroll.trainer.checkpoint import (
    TrainerState,
    load_checkpoint,
    load_weights,
    resolve_resume,
    save_checkpoint,
    save_model,
)
from vroll.trainer.config import TrainConfig
from vroll.trainer.data import PromptSampler, images_of, load_rows, prepare_rows, prompt_of
from vroll.trainer.distributed import as_float, backward, is_sharded, make_accelerator
from vroll.trainer.episodes import (
    episode_columns,
    episode_completions,
    episode_metrics,
    make_episode_runner,
    zero_failed,
)
from vroll.trainer.launcher import start_spare_server
from vroll.trainer.lora import apply_lora, load_adapters
from vroll.trainer.rollout import Generator, Rollout, ServerGenerator, encode_prompts, text_tokenizer
from vroll.trainer.server_pool import ServerPool
from vroll.trainer.vision import ImageCodec, policy_class, prepare_vision_model
from vroll.weightsync.sender import SyncStats, follow_push

log = logging.getLogger("vroll.trainer")


@dataclass
class ScoredRollout:
    """One generation batch, scored: what an algorithm's ``build`` turns into micro-batches."""

    rows: list[dict]  # the prompts' dataset rows, one per prompt
    rollout: Rollout  # every process's completions, prompt-major
    rewards: torch.Tensor  # (N,) weighted total reward of each completion
    per_func: torch.Tensor  # (N, F) each reward function's score (NaN where it abstains)

    def groups(self, chosen: list[int], size: int) -> ScoredRollout:
        """The prompts ``chosen`` (indices into ``rows``) with their ``size`` completions each, in that order."""
        idx = [g * size + j for g in chosen for j in range(size)]
        return ScoredRollout([self.rows[g] for g in chosen], self.rollout.select(idx), self.rewards[idx],
                             self.per_func[idx])

    @classmethod
    def concat(cls, parts: list[ScoredRollout]) -> ScoredRollout:
        """Batches generated one after another, as one."""
        return cls([r for p in parts for r in p.rows],
                   Rollout.concat([p.rollout for p in parts], seconds=sum(p.rollout.seconds for p in parts)),
                   torch.cat([p.rewards for p in parts]), torch.cat([p.per_func for p in parts]))


@dataclass
class GenerationBatch:
    """This process's micro-batches of the current generation batch, and its rollout metrics."""

    micro_batches: list[Any]
    metrics: dict[str, float] = field(default_factory=dict)


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


def load_policy(model: Any, tokenizer: Any, args: TrainConfig, path: str | None = None) -> tuple[Any, Any]:
    """The trainable model and its tokenizer (``path`` overrides, e.g. a checkpoint)."""
    from transformers import AutoTokenizer

    name = path or (model if isinstance(model, str) else None) or args.model_name_or_path
    source = resolve_model(name)
    if model is None or isinstance(model, str) or path:
        dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
        kwargs = {"attn_implementation": args.attn_backend()} if args.attn_implementation else {}
        model = policy_class(source).from_pretrained(source, dtype=dtype, **kwargs)  # a VLM's class for a VLM
    model = prepare_vision_model(model, args.freeze_vision_tower)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source if isinstance(source, str) else model.name_or_path)
    tokenizer = text_tokenizer(tokenizer)  # a VLM's processor may be passed as processing_class
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer


class OnlineTrainer:
    """Base class: model, data, generator, optimizer, loop, artifacts and checkpoints.

    An algorithm subclasses it with ``config_class`` (whose batch arithmetic says how many
    prompts, completions and micro-steps a generation batch has), ``build`` and ``loss``;
    optionally ``setup_model`` (a reference model) and ``metrics`` (per generation batch).
    """

    config_class: type[TrainConfig] = TrainConfig  # what ``args`` must be (and its default)

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: TrainConfig | None = None,
                 train_dataset: Any = None, processing_class: Any = None, callbacks: list[Any] | None = None,
                 peft_config: Any = None) -> None:
        show_info_lines()
        self.args = args = args or self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}")
        args.use_peft = args.use_peft or peft_config is not None  # TRL's peft_config=: LoRA with that config
        self.accelerator: Accelerator = make_accelerator(args)  # DDP, DeepSpeed (--deepspeed) or FSDP2
        args.validate(self.accelerator.num_processes)
        # a server at the default address (two commands, seed 000), else vLLM on the spare GPU (the guide)
        self.vllm_server = start_spare_server(args, self.accelerator)
        set_seed(args.seed)
        self.resume_path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        self.rows = self._rows(train_dataset)
        self.reward_funcs = resolve_reward_funcs(self._reward_specs(reward_funcs))
        self._warn_positional()
        # the initial policy first: a reference model copies it, also when resuming
        model, self.tokenizer = load_policy(model, processing_class, args)
        self.episodes = make_episode_runner(args, self.tokenizer)  # --environment: multi-turn episodes
        model = apply_lora(model, args, self.resume_path, peft_config)  # LoRA (a LoRA checkpoint's own adapters)
        self.setup_model(model)
        if self.resume_path and not args.use_peft and not is_sharded(self.accelerator):
            load_weights(model, self.resume_path)  # (ZeRO/FSDP restore them from sharded/ with the optimizer)
        self.total_steps = args.total_steps(len(self.rows), self.accelerator.num_processes)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.scheduler = self._scheduler()
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.sampler = PromptSampler(len(self.rows), args.data_seed or 0)
        self.state = TrainerState()
        self.artifacts = RunArtifacts(args.output_dir, self.is_main, args.report_to, args.run_name, args.redacted())
        if self.vllm_server is not None:
            self.vllm_server.wait()
        self.generator = self._make_generator()
        self.last_sync: SyncStats | None = None
        self.async_mode, self.ahead = self._make_async()
        self.generation_batch: GenerationBatch | None = None
        self._weights_dirty = True
        self.callback_handler = Callbacks(self)
        for callback in callbacks or []:
            self.add_callback(callback)
        if args.eval_steps:
            from vroll.evaluate import EvalCallback

            self.add_callback(EvalCallback(args.eval_steps, task=args.eval_task, n=args.eval_n,
                                           max_tokens=args.max_completion_length))
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

    def add_callback(self, callback: Any) -> None:
        """Call ``callback(trainer, metrics)`` after every optimizer step (evals, probes, early stops); a
        ``transformers.TrainerCallback`` (instance or class) gets its events (``vroll.trainer.callbacks``)."""
        self.callback_handler.add(callback)

    # ------------------------------------------------------------------ the algorithm

    def setup_model(self, model: Any) -> None:
        """Build what the loss needs beside the policy (a reference model, say)."""

    def build(self, scored: ScoredRollout) -> list[Any]:
        """This process's micro-batches of a scored generation batch (each carries its own normalizer)."""
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
        return self.rollout_metrics(scored.rollout, scored.rewards, scored.per_func)

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
        return prepare_rows(rows, args.dataset_name if train_dataset is None else "train_dataset", args.image_root)

    def _scheduler(self) -> Any:
        from transformers import get_scheduler

        warmup = int(self.args.warmup_ratio * self.total_steps)
        return get_scheduler(self.args.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                             num_training_steps=self.total_steps)

    def _make_generator(self) -> Generator | None:
        args = self.args
        if args.use_vllm and args.vllm_mode == "colocate":
            from vroll.trainer.colocate import make_generator
        else:
            from vroll.trainer.rollout import make_generator
        return make_generator(args, self.accelerator, self.accelerator.unwrap_model(self.model), self.tokenizer)

    def _make_async(self) -> tuple[bool, AsyncRollouts | None]:
        """Async generation: server mode only (the main process holds the producer); colocate runs synchronously."""
        args = self.args
        if not async_mode(args):
            return False, None
        if not self.is_main:
            return True, None
        return True, AsyncRollouts(self._generate_part, self._plan, schedule_for(args, self.total_steps),
                                   args.max_staleness)

    # ------------------------------------------------------------------ rollout

    def _sync_weights(self) -> float:
        start = time.perf_counter()
        if self.generator is not None:
            self.last_sync = self.generator.sync_weights(self.accelerator.unwrap_model(self.model))
        else:  # the other ranks of a sharded model take part in rank 0's per-bucket gathers
            follow_push(self.accelerator.unwrap_model(self.model))
        self.accelerator.wait_for_everyone()
        self._weights_dirty = False
        return time.perf_counter() - start

    def _generate_part(self, planned: Planned) -> Rollout | None:
        """This process's part of a batch: a server's main process generates all of it (the others
        nothing), a local generator this process's contiguous share of the prompts."""
        if self.generator is None or not self.generator.local:
            return self._generate(planned, 0, len(planned.prompts)) if self.is_main else None
        share = math.ceil(len(planned.prompts) / self.accelerator.num_processes)
        first = self.accelerator.process_index * share
        return self._generate(planned, first, first + share)

    def _generate(self, planned: Planned, lo: int, hi: int) -> Rollout:
        """Prompts ``lo:hi`` of a planned batch: single completions, or episodes with ``--environment``."""
        if self.episodes is not None:  # the environment writes each episode's first prompt from its row
            return self.episodes.run(self.generator, [self.rows[i] for i in planned.rows[lo:hi]], planned.sampling, lo)
        return self.generator.generate(planned.prompts[lo:hi], planned.sampling, first_index=lo)

    def _assemble(self, part: Rollout | None) -> Rollout:
        """The whole batch on every process: broadcast from the main process, or the local parts all-gathered."""
        if self.accelerator.num_processes == 1:
            return part
        if self.generator is None or not self.generator.local:
            box = [part]
            broadcast_object_list(box, from_process=0)
            return box[0]
        return Rollout.concat(gather_object([part]))

    def _score(self, rows: list[dict], rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of all completions: each process scores its slice, then all-gather."""
        n = self.args.completions_per_prompt()
        prompts = [prompt_of(r) for r in rows for _ in range(n)]
        cols = {k: [r[k] for r in rows for _ in range(n)] for k in rows[0] if k not in ("prompt", "messages")}
        cols |= episode_columns(rollout)
        lo, hi = self.my_slice(len(prompts))
        conversations = episode_completions(rollout)
        completions = reward_completions(prompts[lo:hi], rollout.texts[lo:hi], conversations and conversations[lo:hi])
        self.callback_handler.sync_state()  # the trainer_state reward functions get
        scores = score(self.reward_funcs, self.args.reward_weights, prompts[lo:hi], completions,
                       {k: v[lo:hi] for k, v in cols.items()}, truncated=rollout.truncated[lo:hi],
                       completion_ids=rollout.completion_ids[lo:hi], trainer_state=self.callback_handler.state)
        per_func, total = scores.per_func, scores.total
        if self.accelerator.num_processes > 1:  # NCCL gathers device tensors only
            device = self.accelerator.device
            per_func, total = gather(per_func.to(device)).cpu(), gather(total.to(device)).cpu()
        return zero_failed(total, rollout), per_func

    def my_slice(self, total: int) -> tuple[int, int]:
        """This process's contiguous share of ``total`` items."""
        share = total // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return rank * share, (rank + 1) * share

    def _plan(self, index: int) -> Planned:
        """Generation batch ``index``: the next prompts, and sampling seeded by the index."""
        args = self.args
        before = self.sampler.state()
        indices = self.sampler.take(args.prompts_per_generation(self.accelerator.num_processes))
        prompts = encode_prompts(self.tokenizer, [prompt_of(self.rows[i]) for i in indices], args.max_prompt_length,
                                 [images_of(self.rows[i]) for i in indices])
        sampling = SamplingSpec(n=args.completions_per_prompt(), max_tokens=args.max_completion_length,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed * 100_003 + index, return_logprobs=self.uses_sampling_logprobs())
        return Planned(index, indices, prompts, sampling, before)

    def _sync_rollout(self, timings: dict[str, float]) -> Taken:
        """Push the weights if they changed, then generate the next batch and wait for it."""
        if self._weights_dirty:
            timings["time/sync_s"] += self._sync_weights()
        planned = self._plan(self.state.generation)
        rollout = self._assemble(self._generate_part(planned))
        timings["time/generate_s"] += rollout.seconds
        return Taken(planned.rows, rollout)

    def _async_rollout(self, timings: dict[str, float]) -> Taken:
        """Once the generator finished what it was given, push the weights if they changed and hand it what
        they allow; then take the next batch it generated (the main process broadcasts it)."""
        ahead = self.ahead  # the main process's; None on the others
        if self._weights_dirty:
            if ahead is not None:
                timings["time/trainer_wait_s"] += ahead.wait_idle()
            timings["time/sync_s"] += self._sync_weights()
            if ahead is not None:
                assert self.last_sync is not None  # the main process holds the server generator
                ahead.pushed(self.last_sync.weight_version)
        box = [ahead.take(self.state.generation, timings) if ahead is not None else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]

    def _new_generation_batch(self, timings: dict[str, float]) -> GenerationBatch:
        scored, metrics = self._scored_generation(timings)
        if self.args.dynamic_sampling:
            scored, metrics = self._with_signal(scored, timings)
        start = time.perf_counter()
        micro_batches = self.build(scored)
        timings["time/train_s"] += time.perf_counter() - start  # reference/old logps are training compute
        # a pool says how many of its servers serve (main process only: it alone holds the generator)
        pool = self.generator.metrics() if isinstance(self.generator, ServerPool) else {}
        return GenerationBatch(micro_batches, self.metrics(scored) | metrics | pool)

    def _scored_generation(self, timings: dict[str, float]) -> tuple[ScoredRollout, dict[str, float]]:
        """The next generation batch, scored, and the generator's metrics of it."""
        taken = self._async_rollout(timings) if self.async_mode else self._sync_rollout(timings)
        self.state.generation += 1
        rows, rollout = [self.rows[i] for i in taken.rows], taken.rollout
        start = time.perf_counter()
        total, per_func = self._score(rows, rollout)
        timings["time/score_s"] += time.perf_counter() - start
        self._log_samples(rows, rollout, per_func)
        return ScoredRollout(rows, rollout, total, per_func), taken.metrics

    def _with_signal(self, first: ScoredRollout, timings: dict[str, float]) -> tuple[ScoredRollout, dict[str, float]]:
        """Dynamic sampling (DAPO; verl's ``filter_groups``): generate again, with the same weights, until the
        batch's number of prompts have completions scored differently (``with_signal``), at most
        ``max_generation_batches`` generations. The batch keeps those prompts, first generated first; short
        of them, it is filled with prompts scored alike (GRPO: no advantage, so they train nothing).

        Returns the batch and the metrics of everything generated (the reward curve stays the policy's,
        not the kept prompts'), with ``dynamic/generations`` and the shares of prompts with signal.
        """
        n, need = self.args.completions_per_prompt(), len(first.rows)
        parts, found = [first], int(self.with_signal(first).sum())
        while found < need and len(parts) < self.args.max_generation_batches:
            parts.append(self._scored_generation(timings)[0])
            found += int(self.with_signal(parts[-1]).sum())
        every = ScoredRollout.concat(parts)
        signal = self.with_signal(every).tolist()
        order = [g for g, s in enumerate(signal) if s] + [g for g, s in enumerate(signal) if not s]
        metrics = self.rollout_metrics(every.rollout, every.rewards, every.per_func) | {
            "dynamic/generations": float(len(parts)),
            "dynamic/signal_frac_generated": sum(signal) / len(signal),
            "dynamic/signal_frac_trained": min(sum(signal), need) / need}
        return every.groups(sorted(order[:need]), n), metrics

    def rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor, per_func: torch.Tensor) -> dict[str, float]:
        """Rewards (total and per function), lengths and generation speed of one rollout."""
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
             "completion/mean_length": float(lengths.mean()), "completion/max_length": float(lengths.max()),
             "completion/truncated_frac": sum(rollout.truncated) / len(rollout.truncated),
             "generate/tokens_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
             "weight_version": float(rollout.weight_version)} | episode_metrics(rollout)
        for i, (name, _) in enumerate(self.reward_funcs):
            col = per_func[:, i]
            m[f"reward/{name}/mean"] = float(col.nanmean())
            m[f"reward/{name}/std"] = float(col[~col.isnan()].std()) if (~col.isnan()).sum() > 1 else 0.0
        return m

    def _log_samples(self, rows: list[dict], rollout: Rollout, per_func: torch.Tensor) -> None:
        n, names = self.args.completions_per_prompt(), [name for name, _ in self.reward_funcs]
        picked = range(0, len(rollout.texts), max(1, len(rollout.texts) // max(1, self.args.num_samples_logged)))
        samples = [{"prompt": prompt_of(rows[i // n]), "completion": rollout.texts[i],
                    "truncated": rollout.truncated[i], "weight_version": rollout.weight_versions[i],
                    "rewards": dict(zip(names, per_func[i].tolist(), strict=True)),
                    **(rollout.episodes[i].sample() if rollout.episodes else {})}  # the whole conversation
                   for i in list(picked)[: self.args.num_samples_logged]]
        self.artifacts.log_samples(self.state.global_step + 1, samples)

    # ------------------------------------------------------------------ loop

    def _optimizer_step(self) -> dict[str, float]:
        args, start = self.args, time.perf_counter()
        timings: dict[str, float] = defaultdict(float)
        generator_busy = self.ahead.generator_busy_s() if self.ahead is not None else 0.0
        losses, micro_metrics = 0.0, []
        per_gen = args.micro_steps_per_generation()
        for i in range(args.gradient_accumulation_steps):
            if self.state.micro_step % per_gen == 0 or self.generation_batch is None:
                self.generation_batch = self._new_generation_batch(timings)
            batches = self.generation_batch.micro_batches
            t = time.perf_counter()
            out = self.loss(self.model, batches[self.state.micro_step % len(batches)])
            backward(self.accelerator, out.loss, last=i == args.gradient_accumulation_steps - 1)
            timings["time/train_s"] += time.perf_counter() - t
            losses += out.loss.item()
            micro_metrics.append(out.metrics)
            self.state.micro_step += 1
        t = time.perf_counter()
        grad_norm = self._step_optimizer()
        timings["time/train_s"] += time.perf_counter() - t
        self.state.global_step += 1
        self._weights_dirty = True
        # the loss is summed over the accumulation window (one number per step, however it is split)
        metrics = self._over_processes({"loss": losses} | _combine(micro_metrics))
        metrics |= self.generation_batch.metrics | dict(timings)
        metrics |= {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                    "time/step_s": time.perf_counter() - start}
        # async: the batches were generated during earlier steps, not on this step's clock
        overlapped = timings["time/generate_s"] if self.async_mode else 0.0
        metrics["time/other_s"] = metrics["time/step_s"] - sum(timings.values()) + overlapped
        if self.ahead is not None:
            busy = self.ahead.generator_busy_s() - generator_busy
            metrics["async/generator_idle_frac"] = max(0.0, 1.0 - busy / metrics["time/step_s"])
        return metrics

    def _over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each process trains on its own share: its loss metrics are averaged over processes
        (``*_max`` / ``*_min`` ones take the max / min)."""
        if self.accelerator.num_processes == 1:
            return metrics

        def tensor(keys: list[str]) -> torch.Tensor:
            return torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)

        keys = sorted(metrics)
        out = dict(zip(keys, self.accelerator.reduce(tensor(keys), reduction="mean").tolist(), strict=True))
        for suffix, op in (("_max", torch.distributed.ReduceOp.MAX), ("_min", torch.distributed.ReduceOp.MIN)):
            picked = [k for k in keys if k.endswith(suffix)]  # the same keys on every process
            if picked:
                extreme = tensor(picked)
                torch.distributed.all_reduce(extreme, op=op)
                out |= dict(zip(picked, extreme.tolist(), strict=True))
        return out

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
        self._weights_dirty = True  # the generator may hold other weights: push before sampling
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
            if self.ahead is not None:
                self.ahead.close()
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
                bar.write(_summary(step, self.total_steps, metrics))
        if self.args.save_steps and step % self.args.save_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def _finish(self) -> None:
        if self._weights_dirty:  # every process: the sync ends with a barrier
            self._sync_weights()  # the server ends up serving the final policy
        if isinstance(self.generator, ServerGenerator | ServerPool):
            # End the sync session now, not when this object is garbage-collected: the server keeps
            # the weights, and the next trainer connects without a 409 (a later push reconnects).
            self.generator.end_sync()
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
        self.state.sampler = self.sampler.state()
        extra: dict[str, Any] = {}
        if self.ahead is not None:  # async: the batches generated ahead are saved, the sampler stands before them
            extra["async"] = ahead = self.ahead.state(self.sampler.state())
            self.state.sampler = ahead.resume_sampler
        mid_batch = self.state.micro_step % self.args.micro_steps_per_generation() != 0
        save_checkpoint(path, self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler,
                        self.state, self.args.save_only_model,
                        extra={"generation_batch": self.generation_batch if mid_batch else None, **extra})
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
        self.state, extra = load_checkpoint(self.resume_path, self.accelerator, self.optimizer, self.scheduler)
        self.sampler.load(self.state.sampler)
        self.generation_batch = extra.get("generation_batch")
        self._resume_async(extra.get("async"))
        self.artifacts.truncate_after(self.state.global_step)
        log.info("resumed from %s at step %d", self.resume_path, self.state.global_step)

    def _resume_async(self, saved: AsyncState | None) -> None:
        """Async: put the saved generated batches back (exact resume); else start at the saved position."""
        if self.ahead is not None and saved is not None:
            self.ahead.load(saved)
            self.sampler.load(saved.sampler)
        elif self.ahead is not None:
            self.ahead.start_at(self.state.generation)
        elif saved is not None and saved.batches and self.is_main:
            log.info("resuming an async checkpoint synchronously: its %d batches generated ahead are generated "
                     "again with the current weights", len(saved.batches))


def _combine(rows: list[dict[str, float]]) -> dict[str, float]:
    """Micro-step metrics -> one per step: the mean, or the max / min of ``*_max`` / ``*_min`` keys."""
    out = {}
    for key in {k for r in rows for k in r}:
        values = [r[key] for r in rows if key in r]
        out[key] = max(values) if key.endswith("_max") else min(values) if key.endswith("_min") else (
            sum(values) / len(values))
    return out


def _summary(step: int, total: int, m: dict[str, float]) -> str:
    rewards = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in sorted(m.items())
                       if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2)
    return (f"step {step}/{total} | reward {m.get('reward/mean', float('nan')):.3f} ({rewards}) | "
            f"loss {m.get('loss', float('nan')):.4f} | len {m.get('completion/mean_length', 0):.1f} | "
            f"{m['time/step_s']:.1f} s/step (gen {m.get('time/generate_s', 0):.1f}"
            + (f" in {m['dynamic/generations']:.0f} batches" if "dynamic/generations" in m else "") + ", "
            f"score {m.get('time/score_s', 0):.2f}, train {m.get('time/train_s', 0):.1f}, "
            f"sync {m.get('time/sync_s', 0):.2f}"
            + (f", waited {m['time/trainer_wait_s']:.1f}" if "time/trainer_wait_s" in m else "") + ")")
