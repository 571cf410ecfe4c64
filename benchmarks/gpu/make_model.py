"""Build a random-weight model of a real architecture, with no download (``vroll.testing.text``).

The layer shapes of a real model (Qwen2.5-0.5B/1.5B/7B, Llama-3.2-1B), random bf16
weights, and the embedded SmolLM2 tokenizer (49,152 tokens, so ``vocab_size`` differs
from the real model's unless ``--vocab-size`` sets it: ``--vocab-size 151936`` gives Qwen's
lm_head). Weights do not change speed. The GPU machine has no network
and no embedded model: export the tokenizer here and carry the folder there.

    python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer   # here, once
    python benchmarks/gpu/make_model.py --shape qwen2.5-0.5b --out /tmp/qwen05b
    python benchmarks/gpu/make_model.py --shape tiny --out /tmp/tiny     # seconds, for CPU checks
    python benchmarks/gpu/make_model.py --shape qwen2.5-1.5b --vocab-size 151936 --out /tmp/q15
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vroll.testing.text import QWEN_VOCAB_SIZE, SHAPES, TOKENIZER_FILES, VOCAB_SIZE, build_text_model, export_tokenizer

# Where run_*.sh and tests/gpu find the exported tokenizer (git-ignored, carried to the device).
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / ".tokenizer"


def tokenizer_dir(given: Path | None) -> Path:
    """``given``, else ``TOKENIZER_DIR``; exported from the embedded model when missing and possible."""
    folder = given or TOKENIZER_DIR
    if (folder / TOKENIZER_FILES[0]).exists():
        return folder
    try:
        return export_tokenizer(folder)
    except (ImportError, RuntimeError) as exc:  # no vroll / no embedded model (the GPU machine)
        raise SystemExit(f"make_model: no tokenizer in {folder} and cannot export one here ({exc}); run "
                         f"`python benchmarks/gpu/make_model.py --export-tokenizer {folder}` where the "
                         "embedded model is, and carry the folder") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b", help="layer shapes to copy")
    p.add_argument("--out", type=Path, help="folder to write (created)")
    p.add_argument("--tokenizer", type=Path, default=None, help=f"tokenizer folder (default {TOKENIZER_DIR})")
    p.add_argument("--export-tokenizer", type=Path, metavar="DIR",
                   help="only copy the embedded model's tokenizer to DIR (to carry to the GPU machine)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random initialization")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help=f"lm_head rows (default: the tokenizer's {VOCAB_SIZE}; Qwen2.5's is {QWEN_VOCAB_SIZE})")
    p.add_argument("--embed-std", type=float, default=0.1,
                   help="rescale the tied embedding to this std (peaked outputs); 0: transformers' init")
    args = p.parse_args(argv)
    if args.export_tokenizer:
        print(f"make_model: tokenizer -> {export_tokenizer(args.export_tokenizer)}")
        return 0
    if args.out is None:
        p.error("--out is required (or --export-tokenizer DIR)")
    start = time.perf_counter()
    if args.vocab_size < VOCAB_SIZE:
        p.error(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's {VOCAB_SIZE}")
    out = build_text_model(args.shape, args.out, args.seed, args.embed_std, tokenizer_dir(args.tokenizer),
                           args.vocab_size)
    info = json.loads((out / "vroll_random_model.json").read_text())
    print(f"make_model: {args.shape} ({info['parameters'] / 1e6:.0f}M parameters, vocabulary {args.vocab_size}, "
          f"bf16) -> {out} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
