"""Which GPU each process uses, and the rule that keeps generation and training apart.

TRL issue #2922: a generation server started on a GPU that a
training process also uses leads to a hang or an out-of-memory error much later, far
from its cause. vroll checks it up front, by GPU UUID (the same physical device under
any ``CUDA_VISIBLE_DEVICES`` numbering):

- server mode: the trainer refuses to start if the server uses one of its GPUs, and
  says how to split them;
- colocate mode: sharing is the point, so the trainer only checks that the engine's
  share of memory is actually free and warns about what is left for training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def gpu_uuid(device: torch.device) -> str | None:
    """The UUID of ``device`` if it is a GPU, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def server_conflict(trainer_uuids: Sequence[str | None], server_uuids: Sequence[str], url: str) -> str | None:
    """The refusal message if any training process shares a GPU with the server, else None.

    ``trainer_uuids[r]`` is process r's GPU (None on CPU).
    """
    shared = [rank for rank, u in enumerate(trainer_uuids) if u is not None and u in set(server_uuids)]
    if not shared:
        return None
    return (
        f"the vroll server at {url} generates on a GPU that training process(es) {shared} also use: generation "
        f"and training on one GPU hang or run out of memory later (TRL issue #2922). Give each its own GPUs: "
        f"e.g. `CUDA_VISIBLE_DEVICES=0 vroll serve --model ...` and `CUDA_VISIBLE_DEVICES=1,2,3 accelerate launch "
        f"--num_processes 3 ...` (--num_processes one fewer than the GPUs), or share one GPU on purpose with "
        f"--vllm_mode colocate."
    )


def check_colocate_memory(device: torch.device, gpu_memory_utilization: float, sleep_mode: bool) -> None:
    """Refuse an engine share that is not free now; warn about what training keeps."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    want = gpu_memory_utilization * total
    gib = 2**30
    if want > free:
        raise ValueError(
            f"colocate: vLLM would take {gpu_memory_utilization:.0%} of {device} ({want / gib:.1f} GiB) but only "
            f"{free / gib:.1f} GiB of {total / gib:.1f} GiB is free with the training model loaded; lower "
            f"--vllm_gpu_memory_utilization to at most {max(0.0, free / total - 0.05):.2f}")
    log.warning(
        "colocate: the vLLM engine shares %s with training and takes %.0f%% of it (%.1f GiB); training keeps "
        "%.1f GiB%s", device, 100 * gpu_memory_utilization, want / gib, (free - want) / gib,
        " while the engine sleeps it gives its memory back" if sleep_mode else
        " (--vllm_enable_sleep_mode releases the engine's memory during training)")
