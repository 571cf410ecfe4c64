"""The ``Generator`` protocol: what the trainer asks of any generation backend.

- ``vroll.generation.server``: a running ``vroll serve`` (``ServerGenerator``); several servers as one
  (``vroll.generation.pool.ServerPool``);
- ``vroll.generation.colocate``: a vLLM engine inside each training process;
- ``vroll.generation.plain``: ``generate()`` on the policy itself, no vLLM at all.

Multi-turn episodes (``vroll.generation.episodes``) and generating ahead
(``vroll.generation.async_generation``) run over any of them; ``vroll.generation.rollouts.Rollouts``
is what the trainer's loop talks to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from vroll.protocol import PromptInput, SamplingSpec

if TYPE_CHECKING:
    from torch import nn

    from vroll.generation.rollout import Rollout
    from vroll.weightsync.sender import SyncStats


class Generator(Protocol):
    """A generation backend: samples completions, takes new weights, says how it is doing.

    ``local``: every training process holds one and generates its own share of a batch (colocate,
    plain); else only the main process holds one and generates the whole batch (servers), and the
    other processes take part in a push through ``vroll.weightsync.sender.follow_push``.

    ``first_index`` of :meth:`generate` is the global index of ``prompts[0]`` in its generation batch:
    a server seeds prompt ``i`` with ``seed + first_index + i`` (``vroll.batching.prompt_seed``), so a
    process that generates only its share samples what one process would have; the colocated engine
    seeds its whole batch with ``seed + first_index`` (reproducible, no per-request generators).
    """

    local: bool

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        """``sampling.n`` completions of every prompt, prompt-major."""
        ...

    def push_weights(self, model: nn.Module) -> SyncStats | None:
        """Make the policy's current weights the ones it samples with (None: nothing moved, it samples the
        policy itself). Every process of a sharded model calls it or ``follow_push`` (collective gathers)."""
        ...

    def end_sync(self) -> None:
        """After the run's last push: end the sync session (a server keeps serving the last weights, and the
        next trainer connects without a 409); a later push reconnects."""
        ...

    def metrics(self) -> dict[str, float]:
        """Its own state, logged with every step (a pool: how many of its servers serve)."""
        ...

    def close(self) -> None:
        """Free what it holds (connections, an engine)."""
        ...
