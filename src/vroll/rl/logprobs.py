"""Log-probabilities of chosen tokens from final hidden states, without the full logits.

``completion_logps`` today projects every completion position to the vocabulary and keeps the
(B, C, V) logits in fp32 for the loss and again for its gradient: at B=4, C=4096 and Qwen's
151,936-token vocabulary one copy is 10 GB. Here the lm_head and the log-softmax run over
``chunk_tokens`` tokens at a time in one autograd Function: the forward keeps the hidden states,
the targets and each token's logsumexp; the backward recomputes each chunk's logits, turns them
into the chunk's gradient (softmax minus one-hot, scaled by the incoming gradient) and drops
them. Peak memory is about two (chunk, V) buffers whatever N is; the cost is one more lm_head
matmul per token (the recompute), 1/3 more lm_head FLOPs.

Why one Function and not ``torch.utils.checkpoint`` per chunk: under DeepSpeed ZeRO-3 every call
of the lm_head *module* all-gathers its partitioned weight, a collective; per-chunk calls (and
their per-chunk recomputes in the backward) make as many collectives as a process has chunks,
and processes with different token counts would wait on each other forever. The Function
gathers the weight once in its forward and once in its backward (``_gathered``, as TRL's
``maybe_gather_lm_head_ctx``), the same count on every process. It must run inside the model's
forward (:func:`scoring_forward`), so DDP's reducer, FSDP2's root unshard (the lm_head weight
is then a plain unsharded tensor; a DTensor is gathered with ``full_tensor``) and ZeRO-3's
gradient hooks see it as part of the wrapped forward. The weight's gradient is each chunk's
product rounded to the compute dtype once and summed in fp32, as the unchunked matmul rounds
once (an accumulation in bf16 would round once per chunk).

Numerics follow ``vroll.rl.losses.selective_log_softmax`` on ``logits.float()``: the matmul runs
in the autocast dtype (the model's own lm_head under autocast), the logits are cast to fp32,
divided by the temperature, and ``gather - logsumexp`` gives the log-probability.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Tokens per chunk: (1024, 151936) fp32 is 0.62 GB; forward and backward hold one fp32 and (briefly) one
# bf16 such buffer. Large enough that the lm_head matmul stays efficient on a GPU.
DEFAULT_CHUNK_TOKENS = 1024
# The dtype the lm_head weight's gradient is summed in over the chunks (tests set bf16 as a control).
_GRAD_SUM_DTYPE = torch.float32


def _gathered(*params: Tensor | None) -> AbstractContextManager:
    """ZeRO-3: the partitioned ``params`` gathered for the block (a collective); otherwise nothing."""
    partitioned = {id(p): p for p in params if p is not None and hasattr(p, "ds_id")}
    if not partitioned:
        return nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # already gathered (a tied embedding the forward holds): gathering again would release it on exit
    todo = [p for p in partitioned.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    return deepspeed.zero.GatheredParameters(todo) if todo else nullcontext()


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(n, H) -> (n, V) fp32 logits, the matmul in ``dtype``."""
    return F.linear(hidden.to(dtype), weight, None if bias is None else bias.to(dtype)).float()


def _logsumexp_(z: Tensor) -> Tensor:
    """(n, V) -> (n,) logsumexp, overwriting ``z`` (no second (n, V) buffer, unlike ``torch.logsumexp``)."""
    top = z.amax(dim=-1, keepdim=True)  # (n, 1)
    return z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))


class _ChunkedLogps(torch.autograd.Function):
    """(N, H) hidden, (V, H) weight -> (N,) logps at ``temperature``, (N,) raw logps (T=1, no gradient)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                chunk_tokens: int, dtype: torch.dtype, with_raw: bool) -> tuple[Tensor, Tensor]:
        N = hidden.shape[0]
        logps = hidden.new_empty(N, dtype=torch.float32)
        lse = hidden.new_empty(N, dtype=torch.float32)  # logsumexp at the temperature, for the backward
        raw = hidden.new_empty(N if with_raw else 0, dtype=torch.float32)
        with torch.no_grad(), _gathered(weight, bias):
            w = weight.to(dtype)  # once, not per chunk
            for lo in range(0, N, chunk_tokens):
                hi, t = min(N, lo + chunk_tokens), targets[lo:lo + chunk_tokens, None]
                z = _logits(hidden[lo:hi], w, bias, dtype)  # (n, V)
                if with_raw and temperature != 1.0:
                    raw[lo:hi] = z.gather(-1, t).squeeze(-1) - torch.logsumexp(z, dim=-1)
                if temperature != 1.0:
                    z.div_(temperature)
                picked = z.gather(-1, t).squeeze(-1)  # (n,)
                lse[lo:hi] = _logsumexp_(z)
                logps[lo:hi] = picked - lse[lo:hi]
                if with_raw and temperature == 1.0:
                    raw[lo:hi] = logps[lo:hi]
                del z  # before the next chunk's logits exist, not after
        ctx.save_for_backward(hidden, targets, lse)
        ctx.weight, ctx.bias = weight, bias  # not saved tensors: ZeRO-3 swaps their storage between passes
        ctx.temperature, ctx.chunk_tokens, ctx.dtype = temperature, chunk_tokens, dtype
        ctx.mark_non_differentiable(raw)
        return logps, raw

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        hidden, targets, lse = ctx.saved_tensors
        weight, bias, T, dtype = ctx.weight, ctx.bias, ctx.temperature, ctx.dtype
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        g = grad_logps.float()
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape if not hasattr(weight, "ds_shape") else weight.ds_shape,
                             dtype=_GRAD_SUM_DTYPE, device=hidden.device) if want_w else None
        grad_b = torch.zeros(bias.shape[0] if not hasattr(bias, "ds_shape") else bias.ds_shape[0],
                             dtype=torch.float32, device=hidden.device) if want_b else None
        with _gathered(weight, bias):
            w = weight.to(dtype)
            for lo in range(0, hidden.shape[0], ctx.chunk_tokens):
                hi = min(hidden.shape[0], lo + ctx.chunk_tokens)
                h, gc = hidden[lo:hi], g[lo:hi, None]  # (n, H), (n, 1)
                dz = _logits(h, w, bias, dtype)  # (n, V), then in place: d logps / d logits x incoming gradient
                if T != 1.0:
                    dz.div_(T)
                dz.sub_(lse[lo:hi, None]).exp_().mul_(-gc)  # -g * softmax
                dz.scatter_add_(-1, targets[lo:hi, None], gc)  # + g at the target
                if T != 1.0:
                    dz.div_(T)
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[lo:hi] = (dz @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (dz.t() @ h.to(dtype)).to(_GRAD_SUM_DTYPE)  # rounded once per chunk, summed in fp32
                del dz
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _head_tensors(head: nn.Module | Tensor) -> tuple[Tensor, Tensor | None]:
    """The lm_head's weight and bias (an FSDP2 DTensor gathered whole: differentiable, its gradient
    reduce-scattered back)."""
    if isinstance(head, Tensor):
        weight, bias = head, None
    else:
        weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def chunked_logps(hidden: Tensor, head: nn.Module | Tensor, targets: Tensor, temperature: float = 1.0, *,
                  with_raw: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """Log-probability of each target token under ``head(hidden)``, never holding (N, V) at once.

    Call it on every process the same number of times (once per forward): under ZeRO-3 it gathers
    the lm_head weight, a collective, once in the forward and once in the backward.

    Args:
        hidden: (N, H) final hidden states (after the model's last norm), one row per token
            whose next token is scored.
        head: the lm_head (a linear module: its weight and bias are used), or its (V, H) weight.
        targets: (N,) token ids, in [0, V).
        temperature: the sampling temperature the logits are divided by.
        with_raw: also return the detached temperature-1 logps (what vLLM reports, for the
            importance-sampling ratio), from the same logits.
        chunk_tokens: tokens per chunk (peak memory ~ chunk_tokens x V x 6 bytes).

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
    weight, bias = _head_tensors(head)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with _gathered(weight, bias):  # gathered already when autograd records the weight's shape
        logps, raw = _ChunkedLogps.apply(hidden, weight, bias, targets, temperature, chunk_tokens, dtype, with_raw)
    return logps, (raw if with_raw else None)


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
        kwargs.pop("labels", None)  # PEFT's forward passes labels=None on; the backbone takes none
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
    completions: ``vroll.trainer.logps.pad_batch``), and where the values go back.

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
