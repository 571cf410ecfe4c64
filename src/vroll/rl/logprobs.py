"""Log-probabilities of chosen tokens from final hidden states, without the full logits.

``completion_logps`` today projects every completion position to the vocabulary and keeps the
(B, C, V) logits in fp32 for the loss and again for its gradient: at B=4, C=4096 and Qwen's
151,936-token vocabulary one copy is 10 GB. Here the lm_head and the log-softmax run over
``chunk_size`` tokens at a time, each chunk under ``torch.utils.checkpoint`` (non-reentrant):
the forward keeps only the chunk's hidden states and its (chunk,) outputs, the backward
recomputes the chunk's logits, takes their gradient and drops them. Peak memory is then
about four (chunk, V) fp32 buffers, whatever N is; the cost is one more lm_head matmul per
token (the recompute), 1/3 more lm_head FLOPs.

Why checkpoint and not a custom ``autograd.Function`` (Liger's and TRL's kernels are those):
the recompute calls the lm_head *module*, so DeepSpeed ZeRO-3's module hooks gather its
partitioned weight in the backward as they do in the forward, and FSDP2/DDP see one use of
the weight per chunk in one graph (one AccumulateGrad, reduced once). A Function that reads
``lm_head.weight`` directly gets ZeRO-3's empty partition unless every caller gathers it
first (TRL's ``maybe_gather_lm_head_ctx``). Reentrant checkpointing is not used: it runs a
nested backward per chunk, which accumulates the weight's gradient once per chunk and trips
DDP's "marked ready twice".

Numerics follow ``vroll.rl.losses.selective_log_softmax`` on ``logits.float()``: the chunk's
logits are cast to fp32 (the matmul itself runs in the autocast dtype, as the model's own
lm_head does), divided by the temperature, and ``gather - logsumexp`` gives the log-probability.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Tokens per chunk: (1024, 151936) fp32 is 0.62 GB; the backward holds ~4 such buffers at once.
# Large enough that the lm_head matmul stays efficient (1024 x H x V on a GPU is many waves).
DEFAULT_CHUNK_TOKENS = 1024

Head = nn.Module | Tensor | Callable[[Tensor], Tensor]


def _project(head: Head, hidden: Tensor) -> Tensor:
    """(n, H) -> (n, V) logits through the lm_head module (hooks fire) or a bare (V, H) weight.

    Under autocast the weight is cast per chunk, not once from autocast's cache: with one cached
    bf16 copy every chunk's weight gradient would be summed in bf16 before reaching the fp32
    weight (one rounding per chunk); cast per chunk, each chunk's gradient is rounded once and
    summed in fp32, as the one matmul of the unchunked path rounds once.
    """
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return F.linear(hidden, head) if isinstance(head, Tensor) else head(hidden)
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False):
        return F.linear(hidden, head) if isinstance(head, Tensor) else head(hidden)


def _chunk_logps(head: Head, temperature: float, with_raw: bool, hidden: Tensor,
                 targets: Tensor) -> tuple[Tensor, Tensor | None]:
    """One chunk: (n, H) hidden and (n,) targets -> (n,) logps at ``temperature`` and (n,) raw (T=1) logps.

    The raw logps come last and without gradient: the non-reentrant checkpoint's recompute stops
    once the tensors the backward needs are rebuilt, so they are never computed twice.
    """
    logits = _project(head, hidden).float()  # (n, V)
    scaled = logits if temperature == 1.0 else logits / temperature  # (n, V)
    index = targets.unsqueeze(-1)  # (n, 1)
    logps = scaled.gather(-1, index).squeeze(-1) - torch.logsumexp(scaled, dim=-1)  # (n,)
    raw = None
    if with_raw:
        with torch.no_grad():
            raw = logps.detach() if temperature == 1.0 else (
                logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1))  # (n,)
    return logps, raw


def chunked_logps(hidden: Tensor, head: Head, targets: Tensor, temperature: float = 1.0, *,
                  with_raw: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """Log-probability of each target token under ``head(hidden)``, never holding (N, V) at once.

    Args:
        hidden: (N, H) final hidden states (after the model's last norm), one row per token
            whose next token is scored.
        head: the lm_head module (preferred: sharding hooks fire), or its (V, H) weight.
        targets: (N,) token ids, in [0, V).
        temperature: the sampling temperature the logits are divided by.
        with_raw: also return the detached temperature-1 logps (what vLLM reports, for the
            importance-sampling ratio); at temperature 1 they are the first output, detached.
        chunk_tokens: tokens per chunk (peak memory ~ 4 x chunk_tokens x V x 4 bytes).

    Returns:
        (N,) fp32 logps at ``temperature`` (with gradient where ``hidden`` or the head has one),
        and (N,) fp32 raw logps or None.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and targets (N,), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[0] == 0:  # no token: still (0,) outputs connected to nothing
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_raw else None)
    step = partial(_chunk_logps, head, temperature, with_raw)
    grad = torch.is_grad_enabled()
    outs = [checkpoint(step, h, t, use_reentrant=False) if grad else step(h, t)
            # split, not slices: its backward concatenates the chunks' gradients once, instead of
            # one zero-filled (N, H) buffer per chunk
            for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True)]
    logps = torch.cat([o[0] for o in outs])  # (N,)
    raw = torch.cat([o[1] for o in outs]) if with_raw else None  # (N,)
    return logps, raw


# ---------------------------------------------------------------------------------------------------------------
# A model forward that returns log-probabilities instead of logits


@dataclass
class ScoreRequest:
    """What one forward scores: N tokens, each by the hidden state of the position before it.

    ``positions`` index the forward's flattened (B * T) hidden states, row-major (the order the
    values go back into a (B, C) layout with ``masked_scatter``).
    """

    positions: Tensor  # (N,) long: flat index of the hidden state that predicts each scored token
    targets: Tensor  # (N,) long: the scored tokens
    temperature: float = 1.0
    with_raw: bool = False
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS


# Configs whose lm_head output is transformed before the softmax (Gemma-2's softcapping, Cohere's scale,
# Granite's divisor, ...): the chunks apply the bare lm_head, so those models keep the unchunked path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")


def supports_scoring(model: nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face causal LM, unwrapped) can be scored by :func:`scoring_forward`:
    a ``base_model`` giving ``last_hidden_state`` and an lm_head applied as is."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all(getattr(text, name, None) in (None, 1.0) for name in _LOGIT_TRANSFORMS)


@contextmanager
def scoring_forward(model: nn.Module) -> Iterator[nn.Module]:
    """While open, ``model(..., score=ScoreRequest)`` returns ``(logps (N,), raw (N,) | None)``.

    ``model`` is the Hugging Face causal LM itself (under DDP/DeepSpeed/FSDP2 and PEFT: the
    unwrapped, base model). Its instance ``forward`` is swapped, not its submodules called from
    outside: the caller still calls the *wrapper* (DDP, the DeepSpeed engine, the FSDP2 root, PEFT),
    so the wrapper's forward runs as always (DDP prepares its reducer, FSDP2 unshards the root's
    parameters and hooks their gradients, ZeRO-3's module hooks gather the lm_head inside the call)
    and only what happens inside the model's own forward changes: the backbone
    (``model.base_model``, which for a vision-language model also runs the vision tower) gives the
    final hidden states, and :func:`chunked_logps` applies the lm_head to the requested positions.
    Without ``score`` the forward is the one it was (accelerate's autocast wrapper included).
    """
    previous = model.__dict__.get("forward")  # accelerate's prepare sets an instance forward
    original = model.forward

    def forward(*args: Any, score: ScoreRequest | None = None, **kwargs: Any) -> Any:
        if score is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state  # (B, T, H)
        picked = hidden.flatten(0, 1).index_select(0, score.positions)  # (N, H)
        return chunked_logps(picked, model.get_output_embeddings(), score.targets, score.temperature,
                             with_raw=score.with_raw, chunk_tokens=score.chunk_tokens)

    model.forward = forward
    try:
        yield model
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


def padded_request(input_ids: Tensor, attention_mask: Tensor, completion_ids: Tensor, temperature: float = 1.0, *,
                   with_raw: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[ScoreRequest, Tensor]:
    """The request scoring every real completion token of a padded batch (left-padded prompts, right-padded
    completions: ``vroll.trainer.policy.pad_batch``), and where the values go back.

    Args:
        input_ids, attention_mask: (B, W) prompt + completion.
        completion_ids: (B, C), the last C columns of ``input_ids``.

    Returns:
        The request (N = real completion tokens) and the (B, C) bool mask of those tokens, for
        :func:`to_rows`. Padding is not scored at all (no lm_head work on it).
    """
    B, W = input_ids.shape
    C = completion_ids.shape[1]
    real = attention_mask[:, W - C:].bool()  # (B, C)
    rows, cols = real.nonzero(as_tuple=True)  # row-major
    positions = rows * W + (W - C - 1 + cols)  # (N,): column P - 1 + t predicts completion token t
    return ScoreRequest(positions, completion_ids[rows, cols], temperature, with_raw, chunk_tokens), real


def to_rows(values: Tensor, mask: Tensor) -> Tensor:
    """(N,) per-token values, row-major, back into the (B, C) layout the losses read; 0 where ``mask`` is False."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)  # (B, C), differentiable in ``values``
