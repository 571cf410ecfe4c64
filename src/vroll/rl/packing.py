"""Padding-free micro-batches: rows packed into one sequence, and micro-batches cut by a token budget.

Packing. A padded micro-batch is as wide as its longest prompt plus its longest completion; with
reasoning-length completions that differ tenfold most of its tokens are padding. Packed, the
rows' real tokens follow one another in a single (1, S) sequence whose positions restart at 0
for each row, and attention must not cross rows:

- on CPU (and with ``sdpa``/``eager`` anywhere), transformers >= 5 sees restarting
  ``position_ids`` with ``attention_mask=None`` and builds the block-diagonal causal mask itself
  (``masking_utils.find_packed_sequence_indices``): exact, but an (S, S) mask and S^2 work;
- on GPU, :func:`varlen_attention` (registered as ``"vroll_varlen"``) runs PyTorch's own
  flash-attention varlen kernel (``torch.nn.attention.varlen``) over the rows' ``cu_seqlens``:
  no mask, no padding, sum(L_i^2) work. Without CUDA it loops over the rows with
  ``scaled_dot_product_attention`` (exact, for tests); a padded batch goes to sdpa as before.

The completion tokens' log-probabilities come back in the padded (B, C) layout the losses read
(:func:`vroll.rl.logprobs.to_rows`), so the losses are unchanged. Vision-language rows stay
padded: Qwen2-VL's multimodal rotary positions are (3, B, T) and derived from the padded batch.

Token budget. :func:`token_budget_partition` cuts rows into the fewest micro-batches whose
tokens fit a budget (verl's dynamic batch size), so one long completion no longer sets the
width of a whole micro-batch; :func:`even_out` gives every process the same count (DDP, ZeRO
and FSDP reduce inside each forward/backward, so the processes must run as many).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vroll.rl.logprobs import DEFAULT_CHUNK_TOKENS, ScoreRequest

VARLEN_ATTENTION = "vroll_varlen"


@dataclass
class PackedRows:
    """B rows (prompt + completion) as one sequence, and which of its tokens are scored."""

    input_ids: Tensor  # (1, S) the rows' real tokens, row after row
    position_ids: Tensor  # (1, S) 0 .. L_i - 1 within each row
    cu_seqlens: Tensor  # (B + 1,) int32: row i is input_ids[0, cu_seqlens[i]:cu_seqlens[i + 1]]
    max_seqlen: int  # the longest row
    positions: Tensor  # (N,) index in S of the token before each completion token (row-major)
    targets: Tensor  # (N,) the completion tokens
    mask: Tensor  # (B, C) bool: the real completion tokens, where the N values go back

    def forward_kwargs(self, varlen: bool = False) -> dict[str, Any]:
        """The model's inputs: no attention mask (packing is read from the positions); with ``varlen``
        also the boundaries :func:`varlen_attention` reads (transformers' flash-attention kwarg names)."""
        out: dict[str, Any] = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None}
        if varlen:
            out |= {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                    "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}
        return out

    def request(self, temperature: float = 1.0, *, with_raw: bool = False,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> ScoreRequest:
        """Score every completion token (``vroll.rl.logprobs.scoring_forward``)."""
        return ScoreRequest(self.positions, self.targets, temperature, with_raw, chunk_tokens)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, completion_ids: Tensor) -> PackedRows:
    """Unpad a batch of left-padded prompts and right-padded completions into one packed sequence.

    Args:
        input_ids, attention_mask: (B, W) as ``vroll.trainer.logps.pad_batch`` builds them.
        completion_ids: (B, C), the last C columns of ``input_ids``.

    Returns:
        The packed rows; S = attention_mask.sum(), N = the real completion tokens.
    """
    B, W = input_ids.shape
    C = completion_ids.shape[1]
    real = attention_mask.bool()  # (B, W)
    lengths = real.sum(-1)  # (B,)
    prompt_lengths = real[:, : W - C].sum(-1)  # (B,)
    if bool((prompt_lengths == 0).any()):
        raise ValueError("pack_rows: every row needs a prompt token (the first completion token is scored by "
                         "the position before it)")
    starts = lengths.cumsum(0) - lengths  # (B,)
    S = int(lengths.sum())
    position_ids = torch.arange(S, device=input_ids.device) - starts.repeat_interleave(lengths)  # (S,)
    completion = real[:, W - C:]  # (B, C): a prefix of each row's completion columns
    rows, cols = completion.nonzero(as_tuple=True)  # row-major
    positions = starts[rows] + prompt_lengths[rows] + cols - 1  # (N,)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
    return PackedRows(input_ids[real].unsqueeze(0), position_ids.unsqueeze(0), cu_seqlens,
                      int(lengths.max()) if B else 0, positions, completion_ids[rows, cols], completion)


# ---------------------------------------------------------------------------------------------------------------
# Attention over packed rows


def varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                     cu_seq_lens_q: Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """Causal attention within each packed row, as a transformers attention function; sdpa otherwise.

    The model keeps this implementation for every forward (set once, see
    :func:`register_varlen_attention`): a padded batch, or ``generate``, goes to transformers' sdpa
    with its usual mask, a packed one to the varlen kernel. Switching implementations around the
    packed forward only would break gradient checkpointing, whose backward recomputes the layers
    after the switch is undone.

    Args:
        query: (1, Hq, S, D); key, value: (1, Hkv, S, D) (grouped-query heads allowed).
        cu_seq_lens_q: (B + 1,) row boundaries (:meth:`PackedRows.forward_kwargs` with ``varlen``); when
            absent, derived from restarting ``position_ids`` (one host sync per layer), so a packed
            input never silently attends across rows.

    Returns:
        (1, S, Hq, D) and no weights, as transformers' attention functions do.
    """
    if cu_seq_lens_q is None and attention_mask is None and query.shape[0] == 1:
        cu_seq_lens_q, max_length_q = _boundaries(kwargs.get("position_ids"))
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1 or sliding_window is not None or dropout:
        raise ValueError(f"{VARLEN_ATTENTION} attention over packed rows: one sequence, no sliding window, no dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D)
    half = _flash_dtype(q)
    if half is not None:
        q, k, v = (t.to(half) for t in (q, k, v))
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, int(max_length_q or 0), scaling)
    else:
        out = _segment_loop(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None  # (1, S, Hq, D)


def _flash_dtype(q: Tensor) -> torch.dtype | None:
    """The 16-bit dtype the flash kernel runs in, or None where it cannot run (CPU, float32 without autocast).

    Under bf16 autocast with float32 master weights, rotary embeddings (computed in float32) promote q and k
    back to float32; autocast does not reach a custom op, so the cast to its dtype is made here, as
    transformers' flash-attention path does."""
    if not q.is_cuda:
        return None
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _boundaries(position_ids: Tensor | None) -> tuple[Tensor | None, int | None]:
    """(B + 1,) row boundaries of one packed sequence from its restarting positions; None if it is one row."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None, None
    starts = (position_ids[0] == 0).nonzero().flatten()  # (B,)
    if starts.numel() <= 1:
        return None, None
    cu = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)  # (B + 1,)
    return cu, int(cu.diff().max())


def varlen_mask(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """The mask transformers builds for :func:`varlen_attention`: none without a padding mask (packed rows
    need none, an unpadded batch is plain causal), sdpa's with one."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _cuda_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None) -> Tensor:
    """PyTorch's flash-attention varlen kernel: (S, H, D) -> (S, Hq, D). Its keyword for causality moved
    between releases (``is_causal`` in 2.10/2.11, ``window_size=(-1, 0)`` later); GQA heads are repeated
    where the release has no ``enable_gqa``."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)


def _segment_loop(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float | None) -> Tensor:
    """The same attention, row by row with ``scaled_dot_product_attention`` (exact; for CPUs and tests)."""
    outs = []
    bounds = cu.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[lo:hi].transpose(0, 1) for t in (q, k, v)]  # (H, L, D)
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                   enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(outs)  # (S, Hq, D)


def register_varlen_attention() -> str:
    """Make :func:`varlen_attention` a transformers attention implementation; returns its name.

    Load the policy with ``attn_implementation=<name>`` (or set ``model.config._attn_implementation``)
    after calling this; every process must call it (the registry is per process).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    return VARLEN_ATTENTION


# ---------------------------------------------------------------------------------------------------------------
# Micro-batches by token budget


def row_cost(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], rows: Sequence[int],
             packed: bool) -> int:
    """Tokens a micro-batch of ``rows`` runs through the model: their sum packed, else the padded
    rectangle (rows x (longest prompt + longest completion), as ``pad_batch`` + ``trimmed`` build it)."""
    if not rows:
        return 0
    if packed:
        return sum(prompt_lengths[i] + completion_lengths[i] for i in rows)
    return len(rows) * (max(prompt_lengths[i] for i in rows) + max(completion_lengths[i] for i in rows))


def token_budget_partition(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], budget: int, *,
                           packed: bool = True) -> list[list[int]]:
    """The rows in the fewest micro-batches whose tokens (:func:`row_cost`) fit ``budget``, balanced.

    Packed: for k = ceil(total / budget), k + 1, ... the rows are dealt longest first to the
    least-loaded of k micro-batches (LPT, ties to the lower index), until every one fits. Padded:
    rows sorted by length (longest first) fill micro-batches in turn, so rows of similar length
    share one and little of it is padding.

    Returns:
        Micro-batches as sorted lists of row indices, ordered by their first row: deterministic for
        the same lengths, whatever the machine.

    Raises:
        ValueError: a row longer than the budget (it can be in no micro-batch).
    """
    if len(prompt_lengths) != len(completion_lengths):
        raise ValueError("token_budget_partition: one prompt length per completion length")
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    sizes = [p + c for p, c in zip(prompt_lengths, completion_lengths, strict=True)]
    if sizes and max(sizes) > budget:
        raise ValueError(f"a row of {max(sizes)} tokens (prompt + completion) exceeds the micro-batch token budget "
                         f"{budget}: raise the budget to at least max_prompt_length + max_completion_length")
    if not sizes:
        return []
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))  # longest first
    if packed:
        parts = _packed_partition(sizes, order, budget)
    else:
        parts = _padded_partition(prompt_lengths, completion_lengths, order, budget)
    return sorted((sorted(p) for p in parts if p), key=lambda p: p[0])


def _packed_partition(sizes: list[int], order: list[int], budget: int) -> list[list[int]]:
    for k in range(max(1, math.ceil(sum(sizes) / budget)), len(sizes) + 1):
        heap = [(0, j) for j in range(k)]  # (load, micro-batch)
        parts: list[list[int]] = [[] for _ in range(k)]
        for i in order:
            load, j = heapq.heappop(heap)
            parts[j].append(i)
            heapq.heappush(heap, (load + sizes[i], j))
        if max(load for load, _ in heap) <= budget:
            return parts
    return [[i] for i in order]  # unreachable: one row each fits (checked by the caller)


def _padded_partition(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], order: list[int],
                      budget: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for i in order:
        if row_cost(prompt_lengths, completion_lengths, [*parts[-1], i], packed=False) > budget:
            parts.append([])
        parts[-1].append(i)
    return parts


def even_out(parts: list[list[int]], count: int, prompt_lengths: Sequence[int],
             completion_lengths: Sequence[int], *, packed: bool = True) -> list[list[int]]:
    """``parts`` made exactly ``count`` micro-batches (every process must run the same number).

    The costliest micro-batch with two rows or more is split in two halves of about equal tokens
    (a split never makes a micro-batch costlier, so the budget still holds) until there are
    ``count``; when no micro-batch has two rows left, empty ones are added: the trainer runs each
    as one row whose loss mask is all zero (a zero loss with a graph, so the collectives inside
    its forward and backward still run).

    Raises:
        ValueError: ``count`` smaller than ``len(parts)``.
    """
    if count < len(parts):
        raise ValueError(f"even_out: {len(parts)} micro-batches cannot become {count}")
    parts = [list(p) for p in parts]
    while len(parts) < count:
        splittable = [j for j, p in enumerate(parts) if len(p) > 1]
        if not splittable:
            parts += [[] for _ in range(count - len(parts))]
            break
        j = max(splittable, key=lambda j: (row_cost(prompt_lengths, completion_lengths, parts[j], packed), -j))
        first, second = _halves(parts[j], prompt_lengths, completion_lengths, packed)
        parts[j:j + 1] = [first, second]
    return parts


def _halves(rows: list[int], prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
            packed: bool) -> tuple[list[int], list[int]]:
    """``rows`` in two non-empty groups of about equal cost (longest first, each to the lighter group)."""
    first: list[int] = []
    second: list[int] = []
    for i in sorted(rows, key=lambda i: (-(prompt_lengths[i] + completion_lengths[i]), i)):
        lighter = first if row_cost(prompt_lengths, completion_lengths, first, packed) <= row_cost(
            prompt_lengths, completion_lengths, second, packed) else second
        lighter.append(i)
    if not second:  # one row dominates: keep the split non-empty
        second.append(first.pop())
    return sorted(first), sorted(second)


def spread(items: list[Any], slots: int) -> list[list[Any]]:
    """``items`` in order over ``slots`` consecutive groups, the later groups taking one more where they do not
    divide evenly, so the last group is never empty while there are items (it ends an accumulation window)."""
    if slots < 1:
        raise ValueError(f"spread: slots must be >= 1, got {slots}")
    base, extra = divmod(len(items), slots)
    out, start = [], 0
    for j in range(slots):
        size = base + (j >= slots - extra)
        out.append(items[start:start + size])
        start += size
    return out
