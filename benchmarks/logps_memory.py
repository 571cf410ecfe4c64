"""Peak memory of the training forward + backward against completion length, today's path and chunked.

The model is a 2-layer Qwen2 with Qwen's 151,936-token vocabulary and hidden size 64, so that the
logits dominate (issue 29's table): B rows of a 16-token prompt and C completion tokens, fp32
weights, bf16 autocast, the sum of the completion logps backpropagated. Legs:

- ``today``: ``vroll.trainer.logps.completion_logps`` (the lm_head over every completion position,
  the (B, C, V) logits in fp32, ``selective_log_softmax``);
- ``chunked``: the same logps from the final hidden states through ``vroll.rl.logprobs`` in chunks
  of ``--chunk-tokens`` tokens (``scoring_forward`` + ``padded_request``).

Each (leg, C) runs in a fresh child process: the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model and batch are built) minus the resident set before the
step is the step's peak growth. CPU only: on a GPU, ``torch.cuda.max_memory_allocated`` tells the
same story (the user-shape benchmark records it). Prints a table with the ratio chunked / today,
writes JSON.

    python benchmarks/logps_memory.py                          # C = 256 .. 2048, B = 2 (~2 minutes)
    python benchmarks/logps_memory.py --lengths 4096 --rows 1  # 4K (today's leg needs ~8 GB)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import default_out, machine_info, print_table, write_json

VOCAB, HIDDEN, PROMPT = 151_936, 64, 16


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(leg: str, rows: int, length: int, chunk_tokens: int) -> dict:
    """One forward + backward in this process; returns its peak growth in bytes and its seconds."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vroll.rl.logprobs import padded_request, scoring_forward, to_rows
    from vroll.trainer.logps import completion_logps, pad_batch

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    batch = pad_batch([torch.randint(0, VOCAB, (PROMPT,), generator=g).tolist() for _ in range(rows)],
                      [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(rows)], pad_id=0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if leg == "today":
            logps, _ = completion_logps(model, batch)
        else:
            request, real = padded_request(batch.input_ids, batch.attention_mask, batch.completion_ids,
                                           chunk_tokens=chunk_tokens)
            with scoring_forward(model):
                logps = to_rows(model(**batch.forward_kwargs(model), score=request)[0], real)
    (logps * batch.completion_mask).sum().backward()
    seconds = time.perf_counter() - start
    return {"leg": leg, "rows": rows, "completion_tokens": length, "peak_growth_bytes": (_rss_kb("VmHWM") - before)
            * 1024, "seconds": seconds, "one_fp32_logits_copy_bytes": rows * length * VOCAB * 4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,512,1024,2048", help="completion lengths C")
    parser.add_argument("--rows", type=int, default=2, help="B")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="the chunked leg's tokens per chunk")
    parser.add_argument("--legs", default="today,chunked")
    parser.add_argument("--out", default=default_out("logps_memory"))
    parser.add_argument("--child", nargs=3, metavar=("LEG", "ROWS", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        leg, rows, length = args.child
        print(json.dumps(child(leg, int(rows), int(length), args.chunk_tokens)))
        return 0
    results = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for leg in args.legs.split(","):
            cmd = [sys.executable, __file__, "--child", leg, str(args.rows), str(length),
                   "--chunk-tokens", str(args.chunk_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{leg} at C={length} failed:\n{proc.stderr[-2000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {leg} C={length}: {results[-1]['peak_growth_bytes'] / 1e9:.2f} GB "
                  f"in {results[-1]['seconds']:.1f} s", flush=True)
    report(results, args)
    return 0


def report(results: list[dict], args: argparse.Namespace) -> None:
    by = {(r["leg"], r["completion_tokens"]): r for r in results}
    lengths = sorted({r["completion_tokens"] for r in results})
    rows = []
    for c in lengths:
        today, chunked = by.get(("today", c)), by.get(("chunked", c))
        rows.append([c, today and today["peak_growth_bytes"] / 1e9, chunked and chunked["peak_growth_bytes"] / 1e9,
                     (today or chunked)["one_fp32_logits_copy_bytes"] / 1e9,
                     chunked["peak_growth_bytes"] / today["peak_growth_bytes"] if today and chunked else None,
                     today and today["seconds"], chunked and chunked["seconds"]])
    print_table(["C", "today GB", "chunked GB", "one fp32 logits GB", "chunked / today", "today s", "chunked s"],
                rows, title=f"peak memory growth of forward + backward, B={args.rows}, V={VOCAB}, hidden {HIDDEN}, "
                            f"bf16 autocast, chunks of {args.chunk_tokens} tokens")
    data = {"machine": machine_info(), "vocab": VOCAB, "hidden": HIDDEN, "prompt_tokens": PROMPT, "rows": args.rows,
            "chunk_tokens": args.chunk_tokens, "results": results,
            "ratio_chunked_over_today": {str(r[0]): r[4] for r in rows if r[4] is not None}}
    print(f"\nwrote {write_json(args.out, data)}")


if __name__ == "__main__":
    sys.exit(main())
