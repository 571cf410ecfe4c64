"""``Rollouts``: the trainer's source of scored generation batches.

One generation batch, in order (every training process runs this; only the main one talks to a server):

1. **push**: if the policy changed since the last push, its weights go to the generator (async: once
   the generator finished what it was handed); the other processes of a sharded model take part in
   the per-bucket gathers (``vroll.weightsync.sender.follow_push``);
2. **plan and generate** (:class:`~vroll.generation.planning.Planner`): a server generator's main
   process generates the whole batch, a local one (colocate, plain) each process its contiguous
   share; with an episode runner, as multi-turn episodes; async: the batch generated ahead is taken
   (``vroll.generation.async_generation`` has the ordering);
3. **assemble** the whole batch on every process: broadcast from the main process, or the shares
   all-gathered;
4. **score**: each process scores its slice, the rewards are all-gathered; a few samples are logged;
5. **dynamic sampling** (DAPO; verl's ``filter_groups``), when asked: generate again with the same
   weights until the batch holds enough prompts whose completions were scored differently.

The trainer calls :meth:`Rollouts.next` at each generation boundary and :meth:`Rollouts.policy_changed`
after each optimizer step; the phases' seconds go to the step's :class:`~vroll.generation.clock.Clock`.
It holds no reference to the trainer (the algorithm's ``with_signal`` comes with each call): a trainer
is freed, and its weight-sync session with it, as soon as the last reference to it goes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather, gather_object

from vroll.batching import process_slice
from vroll.generation.async_generation import AsyncRollouts, AsyncState, Schedule, Taken
from vroll.generation.clock import Clock
from vroll.generation.episodes import (
    EpisodeRunner,
    episode_columns,
    episode_completions,
    episode_metrics,
    zero_failed,
)
from vroll.generation.generator import Generator
from vroll.generation.planning import Planned, Planner
from vroll.generation.rollout import Rollout
from vroll.rewards import reward_completions, score
from vroll.rows import prompt_of
from vroll.weightsync.sender import SyncStats, follow_push

log = logging.getLogger(__name__)


@dataclass
class ScoredRollout:
    """One generation batch, scored: what an algorithm's ``build`` turns into micro-batches."""

    rows: list[dict]  # the prompts' dataset rows, one per prompt
    rollout: Rollout  # every process's completions, prompt-major
    rewards: torch.Tensor  # (N,) weighted total reward of each completion
    per_func: torch.Tensor  # (N, F) each reward function's score (NaN where it abstains)
    reward_names: list[str] = field(default_factory=list)  # (F,)
    # what generating it measured: async staleness, dynamic sampling (then the rewards of everything generated,
    # which the reward curve follows), the generator's own
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # for samples.jsonl: a few of every generation

    def groups(self, chosen: list[int], size: int) -> ScoredRollout:
        """The prompts ``chosen`` (indices into ``rows``) with their ``size`` completions each, in that order."""
        idx = [g * size + j for g in chosen for j in range(size)]
        return ScoredRollout([self.rows[g] for g in chosen], self.rollout.select(idx), self.rewards[idx],
                             self.per_func[idx], self.reward_names, dict(self.metrics), self.samples)

    @classmethod
    def concat(cls, parts: list[ScoredRollout]) -> ScoredRollout:
        """Batches generated one after another, as one."""
        return cls([r for p in parts for r in p.rows],
                   Rollout.concat([p.rollout for p in parts], seconds=sum(p.rollout.seconds for p in parts)),
                   torch.cat([p.rewards for p in parts]), torch.cat([p.per_func for p in parts]),
                   parts[0].reward_names, samples=[s for p in parts for s in p.samples])


def rollout_metrics(scored: ScoredRollout) -> dict[str, float]:
    """Rewards (total and per function), lengths and generation speed of a scored batch."""
    rollout, rewards, per_func = scored.rollout, scored.rewards, scored.per_func
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
         "completion/mean_length": float(lengths.mean()), "completion/max_length": float(lengths.max()),
         "completion/truncated_frac": sum(rollout.truncated) / len(rollout.truncated),
         "generate/tokens_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
         "weight_version": float(rollout.weight_version)} | episode_metrics(rollout)
    for i, name in enumerate(scored.reward_names):
        col = per_func[:, i]
        m[f"reward/{name}/mean"] = float(col.nanmean())
        m[f"reward/{name}/std"] = float(col[~col.isnan()].std()) if (~col.isnan()).sum() > 1 else 0.0
    return m


@dataclass(frozen=True)
class Scoring:
    """How a generation batch is scored, and what of it is logged."""

    reward_funcs: list[tuple[str, Callable[..., Any]]]
    reward_weights: list[float] | None
    completions_per_prompt: int
    samples_logged: int = 4  # completions per generation written to samples.jsonl
    max_generation_batches: int | None = None  # dynamic sampling: generations per batch at most (None: off)
    trainer_state: Callable[[], Any] | None = None  # what reward functions get as trainer_state (TRL's)


class Rollouts:
    """Scored generation batches for the trainer's loop (see the module docstring).

    Args:
        generator: the main process's generator (server mode: None on the other processes).
        planner: the batches' prompts and sampling.
        accelerator: the training job's processes.
        scoring: reward functions and weights, samples logged, dynamic sampling.
        policy: the model to push (unwrapped), asked for at each push.
        episodes: runs each batch as multi-turn episodes (``--environment``, ``--tools``).
        schedule: async generation's schedule (server mode; None: synchronous).
        max_staleness: async: completions more pushes old are generated again.
    """

    def __init__(self, generator: Generator | None, planner: Planner, accelerator: Any, scoring: Scoring,
                 policy: Callable[[], torch.nn.Module], *, episodes: EpisodeRunner | None = None,
                 schedule: Schedule | None = None, max_staleness: int = 1) -> None:
        self.generator, self.planner, self.accelerator, self.scoring = generator, planner, accelerator, scoring
        self.policy, self.episodes = policy, episodes
        self.generation = 0  # generation batches taken so far (the next one's index)
        self.last_sync: SyncStats | None = None
        self.async_mode = schedule is not None
        self.ahead = (AsyncRollouts(self._generate_part, planner.plan, schedule, max_staleness)
                      if schedule is not None and accelerator.is_main_process else None)
        self._dirty = True  # the generator may hold other weights: push before sampling

    # ------------------------------------------------------------------ the trainer's calls

    def next(self, clock: Clock, with_signal: Callable[[ScoredRollout], torch.Tensor] | None = None) -> ScoredRollout:
        """The next scored generation batch (pushing the weights first if they changed).

        ``with_signal``: ``(scored) -> (P,) bool``, the prompts that can teach something (the algorithm's), which
        dynamic sampling keeps.
        """
        scored = self._scored(clock)
        if self.scoring.max_generation_batches is not None:
            assert with_signal is not None, "dynamic sampling needs the algorithm's with_signal"
            scored = self._with_signal(scored, clock, with_signal)
        if self.generator is not None:
            scored.metrics |= self.generator.metrics()  # a pool: how many of its servers serve
        return scored

    def policy_changed(self) -> None:
        """The policy stepped: push its weights before the next generation."""
        self._dirty = True

    def push(self) -> float:
        """Push the policy's weights (every process); returns the seconds it took."""
        start = time.perf_counter()
        model = self.policy()
        if self.generator is not None:
            self.last_sync = self.generator.push_weights(model)
        else:  # the other ranks of a sharded model take part in rank 0's per-bucket gathers
            follow_push(model)
        self.accelerator.wait_for_everyone()
        self._dirty = False
        return time.perf_counter() - start

    def finish(self) -> None:
        """The run's end: the generator ends up serving the final policy, and its sync session ends."""
        if self._dirty:  # every process: the push ends with a barrier
            self.push()
        if self.generator is not None:
            self.generator.end_sync()

    def generator_busy_s(self) -> float | None:
        """Async, main process: seconds its generator has worked so far (None: not async, or another process)."""
        return self.ahead.generator_busy_s() if self.ahead is not None else None

    def close(self) -> None:
        """Stop generating ahead (the generator itself stays open)."""
        if self.ahead is not None:
            self.ahead.close()

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> tuple[dict[str, int], AsyncState | None]:
        """(the prompt sampler's position a synchronous run resumes from, the batches generated ahead).

        Async: waits for the batches in flight; the sampler position is the one before the batches
        generated but not trained on, so a synchronous run can resume from an async checkpoint too.
        """
        sampler = self.planner.sampler.state()
        if self.ahead is None:
            return sampler, None
        ahead = self.ahead.state(sampler)
        return ahead.resume_sampler, ahead

    def resume(self, generation: int, sampler: dict[str, int], ahead: AsyncState | None) -> None:
        """Continue at generation batch ``generation``; async: with the saved batches (exact resume)."""
        self.generation = generation
        self.planner.sampler.load(sampler)
        if self.ahead is not None and ahead is not None:
            self.ahead.load(ahead)
            self.planner.sampler.load(ahead.sampler)
        elif self.ahead is not None:
            self.ahead.start_at(generation)
        elif ahead is not None and ahead.batches and self.accelerator.is_main_process:
            log.info("resuming an async checkpoint synchronously: its %d batches generated ahead are generated "
                     "again with the current weights", len(ahead.batches))

    # ------------------------------------------------------------------ one batch

    def _scored(self, clock: Clock) -> ScoredRollout:
        """The next generation batch, scored, with what its generation measured."""
        taken = self._take_ahead(clock) if self.async_mode else self._take(clock)
        self.generation += 1
        rows, rollout = [self.planner.rows[i] for i in taken.rows], taken.rollout
        with clock.measure("score"):
            total, per_func = self._score(rows, rollout)
        return ScoredRollout(rows, rollout, total, per_func, [name for name, _ in self.scoring.reward_funcs],
                             dict(taken.metrics), self._samples(rows, rollout, per_func))

    def _take(self, clock: Clock) -> Taken:
        """Push the weights if they changed, then generate the next batch and wait for it."""
        if self._dirty:
            clock.add("sync", self.push())
        planned = self.planner.plan(self.generation)
        rollout = self._assemble(self._generate_part(planned))
        clock.add("generate", rollout.seconds)
        return Taken(planned.rows, rollout)

    def _take_ahead(self, clock: Clock) -> Taken:
        """Once the generator finished what it was given, push the weights if they changed and hand it what
        they allow; then take the next batch it generated (the main process broadcasts it)."""
        ahead = self.ahead  # the main process's; None on the others
        if self._dirty:
            if ahead is not None:
                clock.add("trainer_wait", ahead.wait_idle())
            clock.add("sync", self.push())
            if ahead is not None:
                assert self.last_sync is not None  # the main process holds the server generator
                ahead.pushed(self.last_sync.weight_version)
        box = [ahead.take(self.generation, clock) if ahead is not None else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]

    def _generate_part(self, planned: Planned) -> Rollout | None:
        """This process's part of a batch: a server's main process generates all of it (the others
        nothing), a local generator this process's contiguous share of the prompts."""
        if self.generator is None or not self.generator.local:
            return self._generate(planned, 0, len(planned.prompts)) if self.accelerator.is_main_process else None
        lo, hi = process_slice(len(planned.prompts), self.accelerator.process_index, self.accelerator.num_processes)
        return self._generate(planned, lo, hi)

    def _generate(self, planned: Planned, lo: int, hi: int) -> Rollout:
        """Prompts ``lo:hi`` of a planned batch: single completions, or episodes."""
        assert self.generator is not None
        if self.episodes is not None:  # the environment writes each episode's first prompt from its row
            rows = [self.planner.rows[i] for i in planned.rows[lo:hi]]
            return self.episodes.run(self.generator, rows, planned.sampling, lo)
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
        n, acc = self.scoring.completions_per_prompt, self.accelerator
        prompts = [prompt_of(r) for r in rows for _ in range(n)]
        cols = {k: [r[k] for r in rows for _ in range(n)] for k in rows[0] if k not in ("prompt", "messages")}
        cols |= episode_columns(rollout)
        lo, hi = process_slice(len(prompts), acc.process_index, acc.num_processes)
        conversations = episode_completions(rollout)
        completions = reward_completions(prompts[lo:hi], rollout.texts[lo:hi], conversations and conversations[lo:hi])
        state = self.scoring.trainer_state() if self.scoring.trainer_state else None
        scores = score(self.scoring.reward_funcs, self.scoring.reward_weights, prompts[lo:hi], completions,
                       {k: v[lo:hi] for k, v in cols.items()}, truncated=rollout.truncated[lo:hi],
                       completion_ids=rollout.completion_ids[lo:hi], trainer_state=state)
        per_func, total = scores.per_func, scores.total
        if acc.num_processes > 1:  # NCCL gathers device tensors only
            per_func, total = gather(per_func.to(acc.device)).cpu(), gather(total.to(acc.device)).cpu()
        return zero_failed(total, rollout), per_func

    def _samples(self, rows: list[dict], rollout: Rollout, per_func: torch.Tensor) -> list[dict[str, Any]]:
        """A few completions of the batch, evenly spaced, as ``samples.jsonl`` shows them."""
        n, names = self.scoring.completions_per_prompt, [name for name, _ in self.scoring.reward_funcs]
        logged = self.scoring.samples_logged
        picked = range(0, len(rollout.texts), max(1, len(rollout.texts) // max(1, logged)))
        samples = [{"prompt": prompt_of(rows[i // n]), "completion": rollout.texts[i],
                    "truncated": rollout.truncated[i], "weight_version": rollout.weight_versions[i],
                    "rewards": dict(zip(names, per_func[i].tolist(), strict=True)),
                    **(rollout.episodes[i].sample() if rollout.episodes else {})}  # the whole conversation
                   for i in list(picked)[:logged]]
        return samples

    def _with_signal(self, first: ScoredRollout, clock: Clock,
                     with_signal: Callable[[ScoredRollout], torch.Tensor]) -> ScoredRollout:
        """Dynamic sampling: generate again, with the same weights, until the batch's number of prompts have
        completions scored differently (``with_signal``), at most ``max_generation_batches`` generations. The
        batch keeps those prompts, first generated first; short of them, it is filled with prompts scored alike
        (GRPO: no advantage, so they train nothing).

        Its metrics are those of everything generated (the reward curve stays the policy's, not the kept
        prompts'), with ``dynamic/generations`` and the shares of prompts with signal.
        """
        assert self.scoring.max_generation_batches is not None
        n, need = self.scoring.completions_per_prompt, len(first.rows)
        parts, found = [first], int(with_signal(first).sum())
        while found < need and len(parts) < self.scoring.max_generation_batches:
            parts.append(self._scored(clock))
            found += int(with_signal(parts[-1]).sum())
        every = ScoredRollout.concat(parts)
        signal = with_signal(every).tolist()
        order = [g for g, s in enumerate(signal) if s] + [g for g, s in enumerate(signal) if not s]
        kept = every.groups(sorted(order[:need]), n)
        kept.metrics = rollout_metrics(every) | {
            "dynamic/generations": float(len(parts)),
            "dynamic/signal_frac_generated": sum(signal) / len(signal),
            "dynamic/signal_frac_trained": min(sum(signal), need) / need}
        return kept
