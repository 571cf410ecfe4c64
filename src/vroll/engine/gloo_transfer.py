"""``vroll_gloo``: a weight-transfer engine for a *stock* ``vllm serve`` on CPU, registered as a vLLM plugin.

vLLM's native RL API (``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
``/finish_weight_update``) moves weights through an engine picked by ``--weight-transfer-config``.
Its engines (nccl, ipc, ...) need CUDA, so on CPU nothing could receive a push. This one is vLLM's
packed NCCL engine with the transport swapped for gloo:

- init: every worker joins the trainer's ``TCPStore`` and a ``ProcessGroupGloo`` built with
  :func:`vroll.weightsync.group.make_group` (the same group vroll's own sync uses; rank 0 = the
  trainer, worker ``rank_offset + dp_index * (TP*PP) + rank``), its join bounded by
  ``JOIN_TIMEOUT_S`` so a trainer that vanished holds the engine seconds, not minutes;
- each ``/update_weights``: the manifest's tensors, broadcast from rank 0 as raw bytes in uint8
  buffers cut exactly where :func:`vroll.weightsync.buckets.packed_chunks` cuts (vLLM's packed wire
  format), unpacked without copies and handed to the model's own ``load_weights``;
- start/finish: vLLM's layerwise reload, as the nccl engine does (checkpoint-format tensors).

Registered by :mod:`vroll.engine.gloo_plugin` (the ``vllm.general_plugins`` entry point), by module
path: this module is imported only by a server whose ``--weight-transfer-config`` names ``vroll_gloo``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from vroll.engine.worker_extension import _reprocess_tied_twins
from vroll.weightsync.buckets import packed_chunks, to_dtype, unpack_bytes
from vroll.weightsync.group import JOIN_TIMEOUT_S, SyncGroup, join_store, make_group
from vroll.weightsync.native import GlooInitFields, GlooUpdateFields

log = logging.getLogger(__name__)


@dataclass
class GlooInitInfo(GlooInitFields, WeightTransferInitInfo):
    """What the trainer sends to ``/init_weight_transfer_engine`` (fields: ``vroll.weightsync.native``)."""


@dataclass
class GlooUpdateInfo(GlooUpdateFields, WeightTransferUpdateInfo):
    """What the trainer sends to ``/update_weights``: the tensors of this update, in broadcast order."""


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """The worker side: one gloo group with the trainer, packed buffers loaded through ``load_weights``."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: SyncGroup | None = None
        self.info: GlooInitInfo | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()  # a new trainer (or the same one reconnecting) replaces the old group
        pc = self.parallel_config
        rank = init_info.rank_offset + getattr(pc, "data_parallel_index", 0) * pc.world_size + pc.rank
        store = join_store(init_info.master_address, init_info.master_port, init_info.world_size,
                           init_info.timeout_s)
        self.group = make_group(store, rank, init_info.world_size, "gloo", init_info.timeout_s,
                                init_info.session, join_timeout_s=JOIN_TIMEOUT_S)
        self.info = init_info
        log.info("vroll_gloo: joined the trainer's group as rank %d of %d", rank, init_info.world_size)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        # on CPU a tied lm_head keeps its own packed copy of the old embeddings unless processed again
        # (vroll serve's loader does the same; vLLM's nccl engine would serve stale logits here)
        _reprocess_tied_twins(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None or self.info is None:
            raise RuntimeError("vroll_gloo: no trainer group; call /init_weight_transfer_engine first")
        metas = update_info.metas()
        if not self.info.packed:
            for meta in metas:
                out = torch.empty(meta.shape, dtype=to_dtype(meta.dtype))
                self.group.broadcast(out, src=0)
                self.model.load_weights([(meta.name, out)])
            return
        for chunk in packed_chunks(metas, self.info.packed_buffer_size_bytes):
            flat = torch.empty(sum(m.nbytes for m in chunk), dtype=torch.uint8)
            self.group.broadcast(flat, src=0)
            self.model.load_weights(unpack_bytes(chunk, flat))  # views of flat, loaded before it goes

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
