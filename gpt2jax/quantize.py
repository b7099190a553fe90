"""`python -m gpt2jax.quantize --ckpt DIR --out DIR`: an int8 copy of a checkpoint.

    python -m gpt2jax.quantize --ckpt out/shakespeare --out out/shakespeare-int8 \\
        [--granularity channel|tensor] [--norms-too]

The result loads wherever a checkpoint does (`gpt2jax.sample --ckpt`, `eval.perplexity`).
"""

from __future__ import annotations

import sys

from gpt2jax import checkpoint, cli
from gpt2jax.quant import int8


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m gpt2jax.quantize", description=__doc__)
    p.add_argument("--ckpt", required=True, help="training checkpoint (or run) folder")
    p.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    p.add_argument("--granularity", choices=int8.GRANULARITIES, default="channel")
    p.add_argument("--norms-too", action="store_true",
                   help="ablation: quantize the norm leaves as well")
    return p


def _quantize(args) -> None:
    recorded = {"granularity": args.granularity, "skip": "norms_too" if args.norms_too
                else "default"}
    config, params = checkpoint.load(args.ckpt)
    quantized = int8.quantize(params, **int8.options(recorded))
    checkpoint.save_params(args.out, config, quantized, extra={"int8": recorded})
    before, after = int8.nbytes(params), int8.nbytes(quantized)
    print(f"{args.ckpt} -> {args.out}: {before:,} -> {after:,} bytes ({before / after:.3f}x)")


def main(argv=None) -> int:
    return cli.run(_quantize, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
