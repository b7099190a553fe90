"""Token-weighted sliding-window perplexity, the standard method for fixed-length models.

    python -m eval.perplexity (--ckpt DIR | --hf DIR) --data PATH [--context T] [--stride S]

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens
the previous window did not, so every token is scored exactly once, with up to
`context - stride` tokens of left context (the first window: everything before it).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2jax import cli, model
from gpt2jax.config import GPTConfig


def windows(n_tokens: int, context: int, stride: int):
    """(begin, end, first scored target index) of each window; targets are tokens[begin+1:end+1].

    Target j (the token at j + 1) is scored by the first window that reaches it."""
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    out, scored_until = [], 0  # targets [0, scored_until) are done
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context, n_tokens - 1)
        if end <= scored_until:
            continue
        out.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens - 1:
            break
    return out


@functools.partial(jax.jit, static_argnums=(4,))
def _window_nll(params, inputs_BT, targets_BT, mask_BT, config):
    logits, _ = model.apply(params, inputs_BT, config)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets_BT[..., None], -1)[..., 0]
    return jnp.sum(nll * mask_BT), jnp.sum(mask_BT)


def sliding_window_nll(params, config: GPTConfig, tokens, *, context: int | None = None,
                       stride: int | None = None, batch_size: int = 8, progress: bool = True):
    """(mean NLL in nats per scored token, number of scored tokens)."""
    context = context or config.block_size
    stride = stride or context
    if config.pos_embedding == "learned" and context > config.block_size:
        raise ValueError(f"context={context} exceeds block_size={config.block_size} of a model "
                         f"with learned positions: use --context <= {config.block_size}")
    tokens = np.asarray(tokens, np.int32)
    spans = windows(len(tokens), context, stride)
    total, count = 0.0, 0
    bar = tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=not progress)
    for i in bar:
        chunk = spans[i:i + batch_size]
        # fixed [batch_size, context] shapes (padding masked out): one compile
        inputs = np.zeros((batch_size, context), np.int32)
        targets = np.zeros((batch_size, context), np.int32)
        mask = np.zeros((batch_size, context), np.float32)
        for row, (begin, end, first) in enumerate(chunk):
            n = end - begin
            inputs[row, :n] = tokens[begin:end]
            targets[row, :n] = tokens[begin + 1:end + 1]
            mask[row, first - begin:n] = 1.0
        s, c = _window_nll(params, inputs, targets, mask, config)
        total, count = total + float(s), count + int(c)
        bar.set_postfix(ppl=f"{math.exp(total / count):.2f}")
    assert count == len(tokens) - 1, "every token after the first is scored exactly once"
    return total / count, count


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.perplexity", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="gpt2jax training checkpoint directory")
    src.add_argument("--hf", help="Hugging Face GPT-2 directory (or a hub name when online)")
    p.add_argument("--data", required=True, help="a .txt file, or a prepared dir (val.bin)")
    p.add_argument("--context", type=int, default=None, help="window length (default block)")
    p.add_argument("--stride", type=int, default=None, help="default: context (no overlap)")
    p.add_argument("--batch-size", type=int, default=8)
    return p


def _perplexity(args) -> None:
    if args.ckpt:
        from gpt2jax import sources

        config, params = sources.load_checkpoint(args.ckpt)
    else:
        from gpt2jax import hf

        config, params = hf.load(args.hf)
    data = Path(args.data)
    if data.is_dir():
        tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
    else:
        from gpt2jax import tokenizer

        tokens = tokenizer.encode(data.read_text(encoding="utf-8"))
    nll, n = sliding_window_nll(params, config, tokens, context=args.context,
                                stride=args.stride, batch_size=args.batch_size)
    print(f"tokens scored: {n:,}  nll: {nll:.4f} nats  perplexity: {math.exp(nll):.3f}")



def main(argv=None) -> int:
    return cli.run(_perplexity, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
