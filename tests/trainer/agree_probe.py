"""Two processes cut their own rows by a token budget and agree on the count (``torch.distributed.run
--nproc_per_node 2 agree_probe.py --out DIR [--no-agree]``): each writes its counts and micro-batches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed
from accelerate import Accelerator

from vroll.rl.packing import even_out, token_budget_partition
from vroll.trainer.model.distributed import agree_max


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--no-agree", action="store_true", help="the control: each process keeps its own count")
    args = p.parse_args()
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    # two windows per process; process 1's rows are long (more micro-batches), its second window empty
    prompts = [[10] * 4, [10] * 4] if rank == 0 else [[10] * 4, []]
    completions = [[5, 6, 7, 8], [20, 3, 4, 5]] if rank == 0 else [[90, 80, 70, 60], []]
    cuts = [token_budget_partition(p_, c, 100, packed=True) for p_, c in zip(prompts, completions, strict=True)]
    own = [max(1, len(c)) for c in cuts]
    counts = own if args.no_agree else agree_max(acc, own)
    parts = [even_out(c, n, p_, cl, packed=True) for c, n, p_, cl in zip(cuts, counts, prompts, completions,
                                                                           strict=True)]
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"own": own, "counts": counts, "parts": parts}))
    # Leave together: rank 0 hosts the rendezvous store, and a rank still talking to it when rank 0 exits
    # dies in C++ ("recvValue failed ... Connection reset by peer", then terminate), failing the run.
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
