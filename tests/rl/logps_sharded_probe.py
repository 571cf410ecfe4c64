"""One process of DDP, ZeRO-3 or FSDP2 (two processes, gloo): chunked logps through the wrapper's forward.

Run by ``tests/rl/test_logprobs_sharded.py`` under ``torchrun`` (DDP, ZeRO-3 with ``--deepspeed``)
or ``accelerate launch --config_file configs/fsdp2.yaml`` (FSDP2). Every rank builds the same
seeded tiny Llama (tied lm_head) and its own batch; before the model is wrapped, each rank
computes the expected gradient locally: the mean over both ranks' batches of today's
``completion_logps`` loss gradient (what DDP/ZeRO/FSDP's averaging must give). Then the wrapped
model runs ``scoring_forward`` (``--path scoring``) or the trap it avoids (``--path outside``:
the backbone and the lm_head called from outside the wrapper's forward), one backward, and the
full gradient of every parameter is compared. Rank 0 writes ``result.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vroll.rl.logprobs import chunked_logps, padded_request, scoring_forward, to_rows
from vroll.trainer.config import GRPOConfig
from vroll.trainer.logps import completion_logps, pad_batch
from vroll.trainer.model.distributed import make_accelerator


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # big enough that ZeRO-3 partitions the matrices (persistence threshold 10 * hidden)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def batch_of(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 7)]
    comps = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (9, 3 + rank)]
    return pad_batch(prompts, comps, pad_id=0)


def expected_grads(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The mean over the ranks' batches of today's loss gradient, computed here on an unwrapped copy."""
    ref = copy.deepcopy(model)
    for rank in range(world):
        batch = batch_of(rank)
        (completion_logps(ref, batch)[0] * batch.completion_mask).sum().div(world).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def full_grads(accelerator, prepared, names: list[str]) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, however it is held (DDP, DTensor shards, ZeRO-3 partitions)."""
    hf = accelerator.unwrap_model(prepared)
    out = {}
    for name, p in hf.named_parameters():
        if getattr(p, "ds_id", None) is not None:
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(p)
        else:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = grad.detach().float().clone()
    return out


def loss_of(accelerator, prepared, batch, path: str) -> torch.Tensor:
    hf = accelerator.unwrap_model(prepared)
    request, real = padded_request(batch.input_ids, batch.attention_mask, batch.completion_ids, chunk_tokens=3)
    if path == "scoring":
        with scoring_forward(hf):
            logps, _ = prepared(**batch.forward_kwargs(hf), score=request)
    else:  # the trap: submodules called from outside the wrapper's forward
        hidden = hf.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids).last_hidden_state
        logps, _ = chunked_logps(hidden.flatten(0, 1)[request.positions], hf.lm_head, request.targets, chunk_tokens=3)
    return (to_rows(logps, real) * batch.completion_mask).sum()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--path", choices=["scoring", "outside"], default="scoring")
    args = parser.parse_args()
    cfg = GRPOConfig(deepspeed=args.deepspeed, bf16=False, per_device_train_batch_size=2, num_generations=2)
    accelerator = make_accelerator(cfg)
    model = tiny_model()
    want = expected_grads(model, accelerator.num_processes)
    prepared, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    result: dict = {"world": accelerator.num_processes, "path": args.path}
    try:
        loss = loss_of(accelerator, prepared, batch_of(accelerator.process_index), args.path)
        engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None:
            engine.engine.backward(loss)  # reduce (and for ZeRO-3 partition) the gradients, no optimizer step
        else:
            accelerator.backward(loss)
        got = full_grads(accelerator, prepared, list(want))
        result["max_rel_error"] = {n: float((got[n] - w).norm() / w.norm().clamp(min=1e-12)) for n, w in want.items()}
    except Exception as exc:  # noqa: BLE001 - the trap may fail loudly: that is its result
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if accelerator.is_main_process:
        Path(args.out, "result.json").write_text(json.dumps(result))
    if "error" not in result:
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
