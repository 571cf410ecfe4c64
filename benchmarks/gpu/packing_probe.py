"""Which packed (padding-free) attention path is exact and fast on this GPU machine.

The machine has torch (2.11+cu130 when written), transformers (5.17) and no ``flash-attn``
package; vLLM's bundled ``vllm_flash_attn`` is inference-only. This script lists what exists
(``torch.nn.attention.varlen``, ``flex_attention``, transformers' attention implementations,
``flash_attn``, ``vllm.vllm_flash_attn``), then times one training forward + backward of a
Qwen2.5-1.5B-shaped random model (vocabulary 151,936, fp32 weights, bf16 autocast, gradient
checkpointing) on the same rows, laid out as:

- ``padded_sdpa``: today's layout (left-padded prompts, right-padded completions), sdpa with the
  padding mask: the reference;
- ``packed_sdpa``: packed rows, transformers' own detection from the restarting positions (an
  (S, S) block-diagonal mask, so sdpa's masked kernel over all S^2 pairs);
- ``packed_flex``: packed rows, ``attn_implementation="flex_attention"`` (a block-sparse
  BlockMask built from the positions; compiled);
- ``packed_varlen``: packed rows, ``vroll_varlen`` (``vroll.rl.packing``: PyTorch's flash
  varlen kernel over ``cu_seqlens``).

Every leg computes the completion logps through ``vroll.rl.logprobs`` (chunked lm_head), so only
the attention and the layout differ. Per leg: seconds per forward + backward (median of
``--repeats`` after one warm-up), tokens/s (real tokens), peak GPU memory, the largest |logp|
difference to the padded reference and the relative difference of a few weight gradients.
Writes ``$OUT/packing_probe.json`` (or ``--out``).

    python benchmarks/gpu/packing_probe.py                      # on the GPU machine (~3-5 min)
    python benchmarks/gpu/packing_probe.py --shape tiny --rows 4 --max-completion 64 --device cpu  # CPU smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from vroll.rl.logprobs import padded_request, scoring_forward, to_rows
from vroll.rl.packing import pack_rows, register_varlen_attention
from vroll.testing.text import QWEN_VOCAB_SIZE, text_config
from vroll.trainer.logps import TokenBatch, pad_batch

GRADIENTS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")
# each leg's attention, set on the model for the whole leg: forward and (checkpointed) backward
ATTENTION = {"padded_sdpa": "sdpa", "packed_sdpa": "sdpa", "packed_flex": "flex_attention",
             "packed_varlen": "vroll_varlen"}


def inventory() -> dict[str, Any]:
    """What this machine offers for packed attention."""
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                           else None, "attention_functions": sorted(ALL_ATTENTION_FUNCTIONS._global_mapping)}
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["torch_varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError as exc:
        out["torch_varlen_attn"] = f"missing: {exc}"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        out["flex_attention"] = True
    except ImportError as exc:
        out["flex_attention"] = f"missing: {exc}"
    for module in ("flash_attn", "flash_attn_interface", "kernels", "liger_kernel", "vllm.vllm_flash_attn"):
        try:
            out[module] = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as exc:
            out[module] = f"error: {exc}"
    out["vllm_flash_attn_backward"] = _vllm_flash_backward()
    return out


def _vllm_flash_backward() -> str:
    """Whether vLLM's bundled flash-attention can be differentiated (it is built for inference)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        return f"not importable: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "importable; no GPU to try"
    q = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 8], device="cuda", dtype=torch.int32)
    try:
        flash_attn_varlen_func(q, q, q, max_seqlen_q=8, cu_seqlens_q=cu, max_seqlen_k=8, cu_seqlens_k=cu,
                               causal=True).sum().backward()
        return "backward ran"
    except Exception as exc:  # noqa: BLE001
        return f"no backward: {type(exc).__name__}: {str(exc)[:200]}"


def make_rows(rows: int, max_completion: int, min_completion: int, seed: int) -> TokenBatch:
    """``rows`` prompts of 48-80 tokens and long-tailed completions in [min, max] (uniform^3 spread)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 40000, (int(torch.randint(48, 81, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    lengths = [min_completion + int((max_completion - min_completion) * float(torch.rand(1, generator=g)) ** 3)
               for _ in range(rows)]
    lengths[0] = max_completion  # one row at the cap, as a long tail has
    comps = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in lengths]
    return pad_batch(prompts, comps, pad_id=2)


def leg_step(model: Any, batch: TokenBatch, leg: str, device: str) -> torch.Tensor:
    """One forward of ``leg``: the (B, C) completion logps."""
    if leg == "padded_sdpa":
        request, real = padded_request(batch.input_ids, batch.attention_mask, batch.completion_ids)
        with scoring_forward(model), torch.autocast(device, dtype=torch.bfloat16):
            return to_rows(model(**batch.forward_kwargs(model), score=request)[0], real)
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.completion_ids)
    with scoring_forward(model), torch.autocast(device, dtype=torch.bfloat16):
        return to_rows(model(**packed.forward_kwargs(varlen=leg == "packed_varlen"), score=packed.request())[0],
                       packed.mask)


def run_leg(model: Any, batch: TokenBatch, leg: str, repeats: int, device: str) -> dict[str, Any]:
    mask = batch.completion_mask
    model.config._attn_implementation = ATTENTION[leg]
    times, logps = [], None
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(1 + repeats):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logps = leg_step(model, batch, leg, device)
        (logps * mask).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if n in GRADIENTS}
    step = statistics.median(times)
    return {"leg": leg, "seconds": step, "tokens_per_s": int(batch.attention_mask.sum()) / step,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "logps": logps.detach().float(), "grads": grads}


def compare(result: dict[str, Any], ref: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    diff = ((result["logps"] - ref["logps"]) * mask.to(result["logps"].device)).abs().max().item()
    rel = {n: float((g - ref["grads"][n]).norm() / ref["grads"][n].norm().clamp(min=1e-30))
           for n, g in result["grads"].items()}
    return {"max_abs_logp_diff": diff, "grad_rel_diff": rel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-1.5b")
    parser.add_argument("--vocab-size", type=int, default=QWEN_VOCAB_SIZE)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-completion", type=int, default=4096)
    parser.add_argument("--min-completion", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--legs", default="padded_sdpa,packed_varlen,packed_flex,packed_sdpa")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "packing_probe.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {"inventory": inventory(), "args": vars(args), "legs": {}}
    print(json.dumps(report["inventory"], indent=1), flush=True)
    from transformers import AutoModelForCausalLM

    register_varlen_attention()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(text_config(args.shape, args.vocab_size), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    batch = make_rows(args.rows, args.max_completion, args.min_completion, seed=0).to(torch.device(args.device))
    real, padded = int(batch.attention_mask.sum()), batch.attention_mask.numel()
    report |= {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded,
               "parameters": sum(p.numel() for p in model.parameters())}
    print(f"{args.rows} rows: {real} real tokens, {padded} padded ({100 * (1 - real / padded):.0f}% padding)",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    for leg in args.legs.split(","):
        try:
            results[leg] = run_leg(model, batch, leg, args.repeats, args.device)
            entry = {k: v for k, v in results[leg].items() if k not in ("logps", "grads")}
            if "padded_sdpa" in results and leg != "padded_sdpa":
                entry |= compare(results[leg], results["padded_sdpa"], batch.completion_mask)
                entry["speedup_vs_padded"] = results["padded_sdpa"]["seconds"] / results[leg]["seconds"]
        except Exception as exc:  # noqa: BLE001 - a path that does not work here is a result
            entry = {"leg": leg, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                     "trace": traceback.format_exc()[-1500:]}
            if args.device == "cuda":
                torch.cuda.empty_cache()
        report["legs"][leg] = entry
        print(json.dumps(entry, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
