"""Completions as padded tensors, and their per-token log-probabilities under a model.

Prompts are left-padded and completions right-padded, so every completion starts at
the same column and the model only has to produce logits for the last ``C + 1``
positions (``logits_to_keep``): the prompt's logits, which the loss never reads, are
never materialized.

How the forward runs is a :class:`ForwardOptions` (``--padding_free``, ``--logps_chunk_tokens``,
resolved against the model by :func:`forward_options`): the rows packed into one sequence with
restarting positions (``vroll.rl.packing``), and the lm_head applied to chunks of tokens inside
the model's forward (``vroll.rl.logprobs``), so the (B, C, V) fp32 logits never exist. Either
way the values come back in the padded (B, C) layout, so the losses read them as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vroll.rl.logprobs import ScoreRequest, padded_request, scoring_forward, supports_scoring, to_rows
from vroll.rl.losses import selective_log_softmax
from vroll.rl.packing import VARLEN_ATTENTION, pack_rows
from vroll.vision import VisionBatch, is_vision_model

if TYPE_CHECKING:
    from vroll.trainer.config import TrainConfig

log = logging.getLogger(__name__)

# attention implementations that read packed rows' boundaries from the cu_seq_lens_* kwargs
# (transformers' flash paths and vroll's varlen); the others find them from the restarting positions
_VARLEN_KWARGS = (VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                  "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


@dataclass
class TokenBatch:
    """B sequences of prompt + completion, ready for a forward pass."""

    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C)
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) float: 1 on completion tokens
    vision: VisionBatch | None = None  # the rows' images (a vision-language model's prompts)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | list[int]) -> TokenBatch:
        return TokenBatch(**{f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "vision"},
                          vision=None if self.vision is None else self.vision.select(rows))

    def trimmed(self) -> TokenBatch:
        """The same rows without the columns that are padding in every row: left of the prompts and
        right of the completions (rows taken out of a batch no longer need its longest row's width)."""
        C = self.completion_ids.shape[1]
        P = self.input_ids.shape[1] - C
        real = self.attention_mask.bool().any(0)  # (P + C,)
        start = int(real[:P].nonzero()[0]) if bool(real[:P].any()) else P  # prompts are left-padded
        used = real[P:].nonzero()
        width = max(1, int(used[-1]) + 1) if len(used) else 1  # completions are right-padded
        cols = slice(start, P + width)
        return TokenBatch(self.input_ids[:, cols], self.attention_mask[:, cols], self.position_ids[:, cols],
                          self.completion_ids[:, :width], self.completion_mask[:, :width], self.vision)

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "vision"},
                          vision=None if self.vision is None else self.vision.to(device))

    def forward_kwargs(self, model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
        """The model's inputs. With images, no ``position_ids``: the Qwen2-VL family derives its multimodal
        rotary positions from the ids, ``image_grid_thw`` and the attention mask (left/right padding too)."""
        images = self.vision.forward_kwargs(model, self.input_ids) if self.vision is not None else {}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": None if images else self.position_ids, **images}


def pad_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
              token_mask: list[list[int]] | None = None) -> TokenBatch:
    """Left-pad prompts, right-pad completions, and derive masks and positions.

    ``token_mask``: per completion token, 1 where the policy sampled it (``Rollout.completion_mask``);
    the batch's ``completion_mask`` is 0 on padding and where it is 0 (environment tokens: no loss).
    """
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, P - len(p) : P + len(c)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + C)
    completion_mask = mask[:, P:].float()  # (B, C)
    if token_mask is not None:
        trained = torch.zeros((B, C))
        for i, m in enumerate(token_mask):
            trained[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
        completion_mask *= trained
    return TokenBatch(ids, mask, position_ids, ids[:, P:].clone(), completion_mask)


def mask_completions_with(batch: TokenBatch, token_id: int, pad_id: int) -> int:
    """Leave out of the loss every completion that sampled ``token_id``; returns how many.

    A vision-language model reads an image placeholder token in its input as a slot for image
    features, so a completion that sampled one (a random or drifting policy can) cannot be run
    through the training forward as the engine ran it: its rows are masked like truncated ones,
    and the token is replaced in the inputs so that the forward counts only the prompts' images.
    """
    completion_start = batch.input_ids.shape[1] - batch.completion_ids.shape[1]
    hit = (batch.completion_ids == token_id) & (batch.completion_mask > 0)  # (B, C)
    rows = hit.any(-1)  # (B,)
    if rows.any():
        batch.completion_mask[rows] = 0.0
        batch.input_ids[:, completion_start:][hit] = pad_id
    return int(rows.sum())


@dataclass(frozen=True)
class ForwardOptions:
    """How :func:`completion_logps` runs the model (the default: today's padded, full-logits forward)."""

    chunk_tokens: int = 0  # lm_head and log-softmax over this many tokens at a time (0: all logits at once)
    packed: bool = False  # text rows packed into one sequence, positions restarting per row
    varlen_kwargs: bool = False  # packed: pass the rows' boundaries (cu_seq_lens_*) to the attention


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed (``.module``) and PEFT (``get_base_model()``); FSDP2 shards
    the model in place."""
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) and not isinstance(model, PreTrainedModel) else model


def packing_supported(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) attends within packed rows: a text model on transformers' attention
    interface, whose masks follow restarting ``position_ids`` (``masking_utils``) or ``cu_seq_lens``."""
    return bool(getattr(type(model), "_supports_attention_backend", False)) and not is_vision_model(model)


def forward_options(model: nn.Module, args: TrainConfig) -> ForwardOptions:
    """``--padding_free`` and ``--logps_chunk_tokens`` as this policy can run them; what falls back says so once."""
    hf = hf_model(model)
    chunk = args.logps_chunk_tokens
    if chunk and not supports_scoring(hf):
        log.warning("logps_chunk_tokens %d: %s transforms its logits after the lm_head (softcapping, a scale); "
                    "computing the full logits", chunk, type(hf).__name__)
        chunk = 0
    packed = args.padding_free and packing_supported(hf)
    if args.padding_free and not packed:
        log.warning("padding_free: %s trains on padded rows (%s)", type(hf).__name__,
                    "a vision-language model's rotary positions come from the padded batch"
                    if getattr(type(hf), "_supports_attention_backend", False) else
                    "its attention is not on transformers' attention interface, which packed rows need")
    attention = getattr(hf.config, "_attn_implementation", None)
    return ForwardOptions(chunk, packed, packed and attention in _VARLEN_KWARGS)


def completion_logps(model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0, with_raw: bool = False,
                     options: ForwardOptions = ForwardOptions()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each completion token, (B, C); padding positions are junk.

    The first tensor is under the sampling distribution (logits / temperature), what
    the policy gradient needs. With ``with_raw`` the second is at temperature 1 and
    detached: what vLLM reports (``raw_logprobs``), for the importance-sampling ratio.
    ``options``: packed rows and/or the chunked lm_head (then padding positions are 0);
    a batch with images is never packed.
    """
    packed = options.packed and batch.vision is None
    if options.chunk_tokens or packed:
        return _scored_logps(model, batch, temperature, with_raw, options, packed)
    C = batch.completion_ids.shape[1]
    out = model(**batch.forward_kwargs(model), logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # (B, C, V): position t predicts completion token t
    if temperature == 1.0:
        logps = selective_log_softmax(logits, batch.completion_ids)  # (B, C)
        return logps, logps.detach() if with_raw else None
    raw = selective_log_softmax(logits.detach(), batch.completion_ids) if with_raw else None  # (B, C)
    return selective_log_softmax(logits / temperature, batch.completion_ids), raw


def _scored_logps(model: torch.nn.Module, batch: TokenBatch, temperature: float, with_raw: bool,
                  options: ForwardOptions, packed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logps` over packed rows and/or through the chunked lm_head (``scoring_forward``),
    only the real completion tokens scored; the N values go back to (B, C), 0 elsewhere."""
    hf = hf_model(model)
    if packed:
        rows = pack_rows(batch.input_ids, batch.attention_mask, batch.completion_ids)
        kwargs = rows.forward_kwargs(varlen=options.varlen_kwargs)
        request, mask = rows.request(temperature, with_raw=with_raw, chunk_tokens=options.chunk_tokens), rows.mask
    else:
        kwargs = batch.forward_kwargs(hf)
        request, mask = padded_request(batch.input_ids, batch.attention_mask, batch.completion_ids, temperature,
                                       with_raw=with_raw, chunk_tokens=options.chunk_tokens)
    if options.chunk_tokens:
        with scoring_forward(hf):
            logps, raw = model(**kwargs, score=request)  # (N,), (N,) | None
    else:  # packed, and a model whose logits are transformed after the lm_head: its logits at the N positions
        logps, raw = _kept_logits_logps(model, kwargs, request)
    return to_rows(logps, mask), None if raw is None else to_rows(raw, mask)


def _kept_logits_logps(model: torch.nn.Module, kwargs: dict[str, Any],
                       request: ScoreRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) logps (and raw ones) from the model's own logits at ``request.positions`` only (``logits_to_keep``
    takes the indices: (1, N, V) logits, not (1, S, V))."""
    logits = model(**kwargs, logits_to_keep=request.positions, use_cache=False).logits.float()  # (1, N, V)
    targets = request.targets[None]  # (1, N)
    if request.temperature == 1.0:
        logps = selective_log_softmax(logits, targets)[0]
        return logps, logps.detach() if request.with_raw else None
    raw = selective_log_softmax(logits.detach(), targets)[0] if request.with_raw else None
    return selective_log_softmax(logits / request.temperature, targets)[0], raw


@torch.no_grad()
def batched_logps(model: torch.nn.Module, batch: TokenBatch, micro: int, temperature: float = 1.0,
                  options: ForwardOptions = ForwardOptions()) -> torch.Tensor:
    """:func:`completion_logps` without gradients, ``micro`` rows at a time."""
    chunks = [completion_logps(model, batch.select(slice(i, i + micro)), temperature, options=options)[0]
              for i in range(0, len(batch), micro)]
    return torch.cat(chunks)  # (B, C)


def server_logps_tensor(logps: list[list[float]], width: int) -> torch.Tensor:
    """Sampling-time logprobs (from vLLM) right-padded to ``width`` columns, shape (B, width)."""
    out = torch.zeros((len(logps), width), dtype=torch.float32)
    for i, row in enumerate(logps):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out
