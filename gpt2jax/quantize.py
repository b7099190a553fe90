"""`python -m gpt2jax.quantize --ckpt DIR --out DIR`: an int8 copy of a checkpoint.

    python -m gpt2jax.quantize --ckpt out/shakespeare --out out/shakespeare-int8 \\
        [--granularity channel|tensor] [--norms-too]

The result loads wherever a checkpoint does (`gpt2jax.sample --ckpt`, `eval.perplexity`).
"""

from __future__ import annotations

import argparse

from gpt2jax import checkpoint
from gpt2jax.quant import int8


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="training checkpoint (or run) folder")
    p.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    p.add_argument("--granularity", choices=int8.GRANULARITIES, default="channel")
    p.add_argument("--norms-too", action="store_true",
                   help="ablation: quantize the norm leaves as well")
    args = p.parse_args(argv)
    recorded = {"granularity": args.granularity, "skip": "norms_too" if args.norms_too
                else "default"}
    config, params = checkpoint.load(args.ckpt)
    quantized = int8.quantize(params, **int8.options(recorded))
    checkpoint.save_params(args.out, config, quantized, extra={"int8": recorded})
    before, after = int8.nbytes(params), int8.nbytes(quantized)
    print(f"{args.ckpt} -> {args.out}: {before:,} -> {after:,} bytes ({before / after:.3f}x)")


if __name__ == "__main__":
    main()
