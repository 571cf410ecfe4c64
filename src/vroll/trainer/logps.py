"""Completions as padded tensors, and their per-token log-probabilities under a model.

Prompts are left-padded and completions right-padded, so every completion starts at
the same column and the model only has to produce logits for the last ``C + 1``
positions (``logits_to_keep``): the prompt's logits, which the loss never reads, are
never materialized.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from vroll.rl.losses import selective_log_softmax
from vroll.vision import VisionBatch


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


def completion_logps(model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0,
                     with_raw: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each completion token, (B, C); padding positions are junk.

    The first tensor is under the sampling distribution (logits / temperature), what
    the policy gradient needs. With ``with_raw`` the second is at temperature 1 and
    detached: what vLLM reports (``raw_logprobs``), for the importance-sampling ratio.
    """
    C = batch.completion_ids.shape[1]
    out = model(**batch.forward_kwargs(model), logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # (B, C, V): position t predicts completion token t
    if temperature == 1.0:
        logps = selective_log_softmax(logits, batch.completion_ids)  # (B, C)
        return logps, logps.detach() if with_raw else None
    raw = selective_log_softmax(logits.detach(), batch.completion_ids) if with_raw else None  # (B, C)
    return selective_log_softmax(logits / temperature, batch.completion_ids), raw


@torch.no_grad()
def batched_logps(model: torch.nn.Module, batch: TokenBatch, micro: int, temperature: float = 1.0) -> torch.Tensor:
    """:func:`completion_logps` without gradients, ``micro`` rows at a time."""
    chunks = [completion_logps(model, batch.select(slice(i, i + micro)), temperature)[0]
              for i in range(0, len(batch), micro)]
    return torch.cat(chunks)  # (B, C)


def server_logps_tensor(logps: list[list[float]], width: int) -> torch.Tensor:
    """Sampling-time logprobs (from vLLM) right-padded to ``width`` columns, shape (B, width)."""
    out = torch.zeros((len(logps), width), dtype=torch.float32)
    for i, row in enumerate(logps):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out
