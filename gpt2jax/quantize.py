"""`python -m gpt2jax.quantize --ckpt DIR --out DIR`: an int8 copy of a checkpoint.

    python -m gpt2jax.quantize --ckpt out/shakespeare --out out/shakespeare-int8 \\
        [--mode weights|w8a8] [--embeddings] [--smooth ALPHA [--calibration FILE]] \\
        [--granularity channel|tensor]

`--mode w8a8` quantizes the activations too (int8 x int8 dots, faster decode); `--smooth`
first migrates the LayerNorm outputs' outlier channels into the kernels (SmoothQuant),
calibrated on the first `--calibration-tokens` tokens of `--calibration` (default: Tiny
Shakespeare, found as training finds it). The result loads wherever a checkpoint does
(`gpt2jax.sample --ckpt`, `eval.perplexity`, `eval.bench_decode --ckpt`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import checkpoint, cli, sources
from gpt2jax.config import GPTConfig
from gpt2jax.quant import int8

CALIBRATION_TOKENS = 512


def calibrate(params, config: GPTConfig, tokens_BT) -> dict:
    """Per-channel max |input| of `c_attn` and `c_fc` in every layer over `tokens_BT`:
    {"c_attn": [L, D], "c_fc": [L, D]} (what `int8.smooth` needs)."""
    if not config.norms_sublayer_inputs:
        raise ValueError(
            f"SmoothQuant folds its factors into the norm before c_attn and c_fc, which only "
            f"pre-LN and Double Norm have; norm_placement={config.norm_placement!r}: quantize "
            f"without --smooth")
    from gpt2jax.model import check_tokens

    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    check_tokens(tokens_BT, config)  # a token past the vocabulary would calibrate garbage
    absmax = _calibrate(params, tokens_BT, config)
    return {name: jnp.stack([absmax[f"h/{i}/{module}"] for i in range(config.n_layer)])
            for name, module in (("c_attn", "attn/c_attn"), ("c_fc", "mlp/c_fc"))}


@functools.partial(jax.jit, static_argnums=2)
def _calibrate(params, tokens_BT, config):
    """{'h/0/attn/c_attn': max |input| per channel [D], ...} of every Linear, observed by
    intercepting the Linears' calls (the model itself has no calibration branch)."""
    from gpt2jax.layers import Linear
    from gpt2jax.model import GPT  # this module sits above the model

    absmax = {}

    def observe(call, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            x = args[0].astype(jnp.float32)
            absmax["/".join(context.module.path)] = jnp.max(jnp.abs(x), tuple(range(x.ndim - 1)))
        return call(*args, **kwargs)

    with nn.intercept_methods(observe):
        GPT(config).apply({"params": params}, tokens_BT)
    return absmax


def smoothquant(params, config: GPTConfig, tokens, alpha: float = 0.5):
    """Float params with SmoothQuant's migration, calibrated on `tokens` (a 1-D id array cut
    into block_size rows)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1] (SmoothQuant uses 0.5 for GPT-like "
                         f"models; 0 moves nothing into the kernels)")
    tokens = np.asarray(tokens)
    rows = max(1, len(tokens) // config.block_size)
    width = min(config.block_size, len(tokens))
    absmax = calibrate(params, config, tokens[:rows * width].reshape(rows, width))
    return int8.smooth(params, absmax, alpha)


def calibration_tokens(path: str | None, n: int = CALIBRATION_TOKENS) -> np.ndarray:
    """The first `n` GPT-2 tokens of a text file (default: Tiny Shakespeare's training text)."""
    from gpt2jax import tokenizer

    if path is None:
        from gpt2jax.data import shakespeare_path

        path = shakespeare_path()
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8")[: 16 * n])[:n]
    if len(ids) < n:
        raise ValueError(f"{path} holds {len(ids)} tokens; calibration wants {n}: pass a longer "
                         f"--calibration file or a smaller --calibration-tokens")
    return np.asarray(ids, np.int32)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m gpt2jax.quantize", description=__doc__)
    p.add_argument("--ckpt", required=True, help="training checkpoint (or run) folder")
    p.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    p.add_argument("--mode", choices=int8.MODES, default="weights",
                   help="weights: int8 kernels, float activations; w8a8: int8 activations too")
    p.add_argument("--embeddings", action="store_true",
                   help="quantize wte (the tied head) with one scale per row too")
    p.add_argument("--smooth", type=float, metavar="ALPHA", default=None,
                   help="SmoothQuant migration strength before quantizing (0.5 is the paper's)")
    p.add_argument("--calibration", default=None,
                   help="text for --smooth's calibration (default: Tiny Shakespeare)")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS)
    p.add_argument("--granularity", choices=int8.GRANULARITIES, default="channel")
    return p


def _quantize(args) -> None:
    recorded = {"granularity": args.granularity, "skip": "default", "mode": args.mode,
                "embeddings": args.embeddings, "smooth_alpha": args.smooth}
    config, params = sources.load_checkpoint(args.ckpt)
    float_params = params
    if args.smooth is not None:
        tokens = calibration_tokens(args.calibration, args.calibration_tokens)
        params = smoothquant(params, config, tokens, args.smooth)
    quantized = int8.quantize(params, **int8.options(recorded))
    checkpoint.save_params(args.out, config, quantized, extra={"int8": recorded})
    before, after = int8.nbytes(float_params), int8.nbytes(quantized)
    print(f"{args.ckpt} -> {args.out}: {before:,} -> {after:,} bytes ({before / after:.3f}x)")


def main(argv=None) -> int:
    return cli.run(_quantize, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
