import pytest
import torch

from vroll.protocol import Bucket, TensorMeta
from vroll.weightsync.buckets import BucketBuffers, dtype_name, pack, plan_buckets, to_dtype, unpack


def metas(tensors):
    return [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def test_plan_is_dtype_homogeneous_bounded_and_complete():
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 64, generator=g).to(torch.bfloat16 if i % 3 else torch.float32)
               for i in range(10)}
    tensors["big"] = torch.randn(300, 300, generator=g)  # larger than a bucket: gets its own
    plan = plan_buckets(metas(tensors), bucket_bytes=3 * 64 * 64 * 2)
    names = [t.name for b in plan for t in b.tensors]
    assert sorted(names) == sorted(tensors)
    for b in plan:
        assert {t.dtype for t in b.tensors} == {b.dtype}
        assert b.nbytes <= 3 * 64 * 64 * 2 or len(b.tensors) == 1
    bf16_order = [t.name for b in plan if b.dtype == "bfloat16" for t in b.tensors]
    assert bf16_order == [n for n in tensors if tensors[n].dtype == torch.bfloat16]


def test_pack_unpack_round_trip_is_exact():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4), "c": torch.randn(2, 2, 2)}
    (bucket,) = plan_buckets(metas(tensors), 1 << 20)
    flat = pack(bucket, tensors, torch.device("cpu"))
    assert flat.numel() == 6 + 4 + 8 and flat.dim() == 1
    out = dict(unpack(bucket, flat))
    for name, t in tensors.items():
        assert torch.equal(out[name], t)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="bucket size must be positive"):
        plan_buckets([], 0)
    with pytest.raises(ValueError, match="unsupported dtype 'int3'"):
        to_dtype("int3")
    (bucket,) = plan_buckets([TensorMeta("x", "float32", (2, 2))], 1024)
    with pytest.raises(ValueError, match=r"x: planned shape \(2, 2\), got \(4,\)"):
        pack(bucket, {"x": torch.zeros(4)}, torch.device("cpu"))


def test_buckets_and_results_survive_vllms_msgpack_rpc_as_dicts():
    """vLLM 0.22's multiprocess worker RPC (GPU) delivers dataclasses as dicts: both ends rebuild them."""
    import dataclasses

    from vroll.protocol import ReceiveResult

    bucket = Bucket("bfloat16", (TensorMeta("a.weight", "bfloat16", (2, 3)), TensorMeta("b", "bfloat16", (4,))))
    as_dict = dataclasses.asdict(bucket)
    as_dict["tensors"] = [dict(t, shape=list(t["shape"])) for t in as_dict["tensors"]]  # msgpack: lists
    assert Bucket.from_rpc(as_dict) == bucket
    assert Bucket.from_rpc(bucket) is bucket
    assert ReceiveResult.from_rpc({"ok": False, "intact": True, "message": "m"}) == ReceiveResult(False, True, "m")


def test_the_torch_free_dtype_table_agrees_with_torch():
    """``vroll.protocol`` sizes wire dtypes without torch (the HTTP client needs none): one table per side,
    so this keeps them equal."""
    from vroll.protocol import DTYPE_SIZES, dtype_size, is_floating
    from vroll.weightsync.buckets import DTYPES

    assert list(DTYPE_SIZES) == list(DTYPES)
    for name, dtype in DTYPES.items():
        assert dtype_size(name) == dtype.itemsize and is_floating(name) == dtype.is_floating_point
    assert TensorMeta("w", "bfloat16", (3, 5)).nbytes == 30
    with pytest.raises(ValueError, match="unsupported dtype 'int3'"):
        dtype_size("int3")


def test_kept_buffers_are_reused_and_hold_only_the_new_bucket():
    """A bucket packed into a kept buffer (the push's one buffer, a worker's per-bucket ones) is the same
    memory every time, grows only when a bucket needs more, and reads back exactly that bucket, whatever
    an earlier, larger bucket left there. fp32 tensors into a bf16 bucket: the cast happens in the copy."""
    big = {"w": torch.full((64, 64), 7.0)}
    small = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.randn(5).t()}
    buffers = BucketBuffers(torch.device("cpu"))
    (b_big,) = plan_buckets([TensorMeta("w", "bfloat16", (64, 64))], 1 << 20)
    (b_small,) = plan_buckets([TensorMeta(n, "bfloat16", tuple(t.shape)) for n, t in small.items()], 1 << 20)
    first = pack(b_big, big, torch.device("cpu"), buffers.get(0, b_big))
    again = pack(b_small, small, torch.device("cpu"), buffers.get(0, b_small))
    assert again.data_ptr() == first.data_ptr() and buffers.nbytes == 64 * 64 * 2  # no new allocation
    assert again.dtype == torch.bfloat16 and again.numel() == 11
    for name, view in unpack(b_small, again):
        assert torch.equal(view, small[name].to(torch.bfloat16))
    assert buffers.holds(again[2:]) and not buffers.holds(small["a"])
    other = buffers.get(1, b_small)  # another index: its own memory
    assert other.data_ptr() != again.data_ptr() and not buffers.holds(torch.empty(3))
    with pytest.raises(ValueError, match="buffer of 11 torch.bfloat16 for a bucket of 4096 bfloat16"):
        pack(b_big, big, torch.device("cpu"), again)


def test_packed_chunks_cut_where_vllms_packed_producer_cuts():
    """The receiver of vLLM's packed broadcast knows only the manifest: its cuts must be the producer's."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    from vroll.weightsync.buckets import packed_chunks, unpack_bytes

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2), (11, 3), (1,), (40,), (6, 6)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    tensors = [(f"t{i}", torch.randn(s, generator=g).to(dtypes[i % 3])) for i, s in enumerate(shapes)]
    manifest = metas(dict(tensors))
    for buffer_bytes in (1, 50, 100, 10**6):
        items = iter(tensors)
        sent = []
        while (chunk := pack_tensors(items, lambda item: item[1], buffer_bytes)) is not None:
            sent.append(chunk)
        cuts = packed_chunks(manifest, buffer_bytes)
        assert [[m.name for m in c] for c in cuts] == [c.names for c in sent], buffer_bytes
        for chunk, cut in zip(sent, cuts, strict=True):
            for name, got in unpack_bytes(cut, chunk.packed_tensor):
                assert torch.equal(got, dict(tensors)[name])
    with pytest.raises(ValueError, match="must be positive"):
        packed_chunks(manifest, 0)
