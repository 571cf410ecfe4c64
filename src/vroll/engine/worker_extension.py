"""Runs inside every vLLM worker: joins the trainer's group and loads new weights.

vLLM mixes this class into its ``Worker`` when the engine is built with
``worker_extension_cls``; the replica calls the methods through
``LLM.collective_rpc``, so every tensor-parallel worker runs them at once.

Ordering of one sync, on every worker (the trainer mirrors it, see
``vroll.weightsync.sender``):

1. receive bucket 0..K-1 by broadcast from rank 0 (the trainer), in manifest order;
2. ``all_ok`` barrier: every rank learns that every rank has every byte;
3. load through vLLM's own path, ``Worker.reload_weights`` (layerwise reload of
   checkpoint-format tensors: it re-runs the weight processing that, for example,
   repacks CPU weights, which plain ``param.copy_`` or ``weight_loader`` calls miss);
   on CUDA, for a model with no such processing, the model's ``load_weights``
   (:func:`loads_in_place`).

With ``atomic=True`` step 3 starts only after step 2, so a trainer that dies
mid-sync leaves the old weights untouched. With ``atomic=False`` tensors are loaded
as their bucket arrives (less memory); a failure then leaves a half-loaded model, and
the method says so, so the replica stops serving until the next complete sync.

Joining is bounded (``vroll.weightsync.group.JOIN_TIMEOUT_S``): the replica serves
generation between jobs, so a trainer that vanished after ``/weights/init`` must not
hold it for the collective timeout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch

from vroll.engine.native_transfer import NativeTransferMixin
from vroll.protocol import Bucket, ReceiveResult
from vroll.weightsync.buckets import BucketBuffers, to_dtype, unpack
from vroll.weightsync.group import JOIN_TIMEOUT_S, SyncGroup, join_store, make_group


class WeightSyncExtension(NativeTransferMixin):
    """Worker-side weight sync (attributes live on the vLLM ``Worker`` instance); vLLM's own
    weight-transfer protocol (TRL's client) comes from :class:`NativeTransferMixin`."""

    _vroll_group: SyncGroup | None = None
    _vroll_buffers: BucketBuffers | None = None  # receive buffers kept between syncs (CPU only)

    def vroll_init_group(
        self, host: str, port: int, world_size: int, rank_offset: int, backend: str,
        timeout_s: float, session: str,
    ) -> int:
        """Join the trainer's group as rank ``rank_offset + tp_rank``; returns that rank."""
        self.vroll_close_group()
        rank = rank_offset + self.rank  # type: ignore[attr-defined]
        store = join_store(host, port, world_size, timeout_s, JOIN_TIMEOUT_S)
        self._vroll_group = make_group(store, rank, world_size, backend, timeout_s, session, JOIN_TIMEOUT_S)
        return rank

    def vroll_close_group(self) -> None:
        """Leave the trainer's group, of either protocol (idempotent)."""
        self.vroll_native_close()
        if self._vroll_group is not None:
            self._vroll_group.close()
            self._vroll_group = None
        self._vroll_buffers = None  # kept for one trainer's session, not for the life of the server

    def vroll_receive_weights(self, buckets: list[Bucket], atomic: bool, lora: dict | None = None,
                              adapter_id: int = 0) -> ReceiveResult:
        """Receive one sync (the buckets in broadcast order) and load it. ``lora``: the buckets are a LoRA
        adapter's factors with this config, registered as adapter ``adapter_id`` (always received whole first)."""
        buckets = [Bucket.from_rpc(b) for b in buckets]
        group = self._vroll_group
        if group is None:
            return ReceiveResult(False, True, "no trainer group: call /weights/init first")
        if lora is not None:
            return self._receive_then_load(group, buckets, lambda weights: self._load_lora(weights, lora, adapter_id))
        if atomic:
            return self._receive_then_load(group, buckets)
        return self._stream_load(group, buckets)

    def vroll_load_local(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Load tensors handed over in-process (colocate mode: no group, no copies)."""
        self._load(iter(weights))

    def vroll_load_lora(self, tensors: dict[str, torch.Tensor], config: dict, adapter_id: int) -> list[int]:
        """Register PEFT-named adapter tensors (``...q_proj.lora_A.weight``) as adapter ``adapter_id``, in memory.

        vLLM's own ``add_lora`` reads a folder; this builds the same ``LoRAModel`` from the tensors
        (``LoRAModel.from_lora_tensors``), checked against the engine's ``max_lora_rank`` as a folder
        would be. Every older version is removed first: requests then carry the new id alone, and
        vLLM's scheduler, which finds it already loaded, never looks for its (fake) path.
        Returns the adapter ids loaded afterwards (``[adapter_id]``).
        """
        from vroll.engine.vllm_adapter import lora_model_from_tensors

        manager = self.model_runner.lora_manager  # type: ignore[attr-defined]
        lora = lora_model_from_tensors(manager, tensors, config, adapter_id)
        adapters = manager._adapter_manager  # the worker manager's only handle on its loaded models
        for old in list(adapters.list_adapters()):
            adapters.remove_adapter(old)
        adapters.add_adapter(lora)
        adapters.activate_adapter(adapter_id)
        return sorted(adapters.list_adapters())

    def _recv(self, group: SyncGroup, index: int, bucket: Bucket) -> torch.Tensor:
        """Bucket ``index`` of this sync, received: (numel,) of its dtype.

        On CPU into a buffer kept from the last sync: a fresh one is page-faulted in by the receive
        itself (the allocator returns big blocks to the OS on free), which cost as much as the copy.
        Every bucket of a sync has its own (the load may hold a view of one bucket while reading the
        next). On GPU the caching allocator already reuses the memory, and a kept buffer would
        outlive a sleeping engine's freed memory, so each sync allocates. A GPU worker reached over
        gloo receives on CPU into pinned buffers (the source of its copies to the GPU).
        """
        if group.device.type == "cpu":
            if self._vroll_buffers is None:
                self._vroll_buffers = BucketBuffers(group.device, pin=True)
            flat = self._vroll_buffers.get(index, bucket)
        else:
            flat = torch.empty(bucket.numel, dtype=to_dtype(bucket.dtype), device=group.device)
        group.broadcast(flat, src=0)
        return flat

    def _load_lora(self, weights: Iterator[tuple[str, torch.Tensor]], lora: dict, adapter_id: int) -> None:
        if getattr(getattr(self, "model_runner", None), "lora_manager", None) is None:
            raise ValueError("this server serves no LoRA adapters: start vroll serve with --enable-lora "
                             "(and --max-lora-rank >= the trainer's --lora_r), or use --vllm_lora_sync merged")
        # copies: the receive buffers are reused by the next sync, the adapter must outlive it
        self.vroll_load_lora({name: t.clone() for name, t in weights}, lora, adapter_id)

    def _receive_then_load(self, group: SyncGroup, plan: list[Bucket],
                           load: Callable[[Iterator[tuple[str, torch.Tensor]]], None] | None = None) -> ReceiveResult:
        try:
            flats = [self._recv(group, k, b) for k, b in enumerate(plan)]
            trainer_ok = group.all_ok(True)
        except Exception as exc:  # the trainer died or timed out: keep the old weights
            self.vroll_close_group()
            return ReceiveResult(False, True, f"receive failed, previous weights kept: {exc}")
        if not trainer_ok:
            return ReceiveResult(False, True, "the trainer cancelled this sync (NaN/inf weights), "
                                              "previous weights kept")
        weights = itertools.chain.from_iterable(unpack(b, f) for b, f in zip(plan, flats, strict=True))
        try:
            (load or self._load)(weights)
        except Exception as exc:  # an adapter that failed to load leaves the base weights as they were
            return ReceiveResult(False, load is not None, f"loading received weights failed: {exc}")
        return ReceiveResult(True, True)

    def _stream_load(self, group: SyncGroup, plan: list[Bucket]) -> ReceiveResult:
        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for k, bucket in enumerate(plan):
                yield from unpack(bucket, self._recv(group, k, bucket))
            if not group.all_ok(True):
                raise RuntimeError("the trainer cancelled this sync (NaN/inf weights)")

        try:
            self._load(stream())
        except Exception as exc:
            self.vroll_close_group()
            return ReceiveResult(False, False, f"streamed sync failed, model is half-updated: {exc}")
        return ReceiveResult(True, True)

    def _load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        model = self.get_model()  # type: ignore[attr-defined]
        if loads_in_place(model, self.model_config.quantization, torch.cuda.is_available()):  # type: ignore[attr-defined]
            model.load_weights(weights)
        else:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
            _reprocess_tied_twins(model)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._vroll_buffers is not None and any(self._vroll_buffers.holds(p) for p in model.parameters()):
            self._vroll_buffers = None  # a loader kept our memory as a weight: the next sync must not overwrite it


IN_PLACE_METHODS = frozenset({"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"})


def loads_in_place(model: torch.nn.Module, quantization: str | None, cuda: bool) -> bool:
    """Whether the model's own ``load_weights`` is a complete reload (what TRL's colocate calls).

    It copies each checkpoint tensor into its parameter through the parameter's weight loader
    (fusing q/k/v and gate/up as the checkpoint loader does), in place, so CUDA graphs and the
    compiled model keep pointing at the same memory. What it skips is the per-layer weight
    processing, which for unquantized linear and embedding layers is nothing on CUDA (on CPU it
    repacks weights for the GEMM library, and quantized or MoE layers re-layout theirs), so
    there vLLM's layerwise ``reload_weights`` is needed. Its per-layer bookkeeping is what the
    fast path saves: 0.14 s per sync of SmolLM2-135M on an H100 (docs/performance.md).
    """
    if not cuda or quantization is not None:
        return False
    methods = {type(m.quant_method).__name__ for m in model.modules() if getattr(m, "quant_method", None) is not None}
    return methods <= IN_PLACE_METHODS


def _reprocess_tied_twins(model: torch.nn.Module) -> None:
    """Re-run weight processing for modules whose weight is tied to an earlier module's.

    Layerwise reload processes a tied parameter once, for its first owner (vLLM
    documents this limitation). On CPU that is not enough: the tied ``lm_head`` packs
    its weight into its own GEMM handle when processed, so without this it would keep
    computing logits with the *old* embeddings while everything else uses the new ones.
    Processing the twin again rebuilds that handle from the (shared, new) weight.
    """
    owners: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or method is None:
            continue
        if weight.data_ptr() in owners:
            method.process_weights_after_loading(module)
        owners.add(weight.data_ptr())
