"""Sliding-window perplexity equals a direct token-by-token computation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gpt2jax
from eval.perplexity import sliding_window_nll, windows
from gpt2jax.config import GPTConfig

CONFIG = GPTConfig(vocab_size=53, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _direct_nll(params, tokens, context, stride):
    """Score target j with the window the definition assigns it, one forward per token."""
    total = 0.0
    starts = list(range(0, len(tokens) - 1, stride))
    for j in range(len(tokens) - 1):
        # the first window [b, b + context) that contains target position j
        begin = next(b for b in starts if b <= j < b + context)
        logits, _ = gpt2jax.forward(params, np.asarray(tokens[begin:j + 1])[None], CONFIG)
        logp = jax.nn.log_softmax(logits[0, -1])
        total -= float(logp[tokens[j + 1]])
    return total / (len(tokens) - 1)


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 8), (12, 5), (8, 1)])
def test_matches_direct_computation(context, stride):
    params = gpt2jax.init_params(CONFIG, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 41)
    nll, n = sliding_window_nll(params, CONFIG, tokens, context=context, stride=stride,
                                batch_size=4, progress=False)
    assert n == len(tokens) - 1
    assert nll == pytest.approx(_direct_nll(params, tokens, context, stride), rel=1e-5)


def test_every_target_scored_once_with_bounded_context():
    spans = windows(100, context=16, stride=6)
    scored = [j for begin, end, first in spans for j in range(first, end)]
    assert scored == list(range(99))
    for begin, _end, first in spans[1:]:
        assert first - begin >= 16 - 6  # at least context - stride tokens of left context


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride=0 must be in"):
        windows(10, 4, 0)
    params = gpt2jax.init_params(CONFIG, jax.random.key(0))
    with pytest.raises(ValueError, match="context=32 exceeds block_size=16"):
        sliding_window_nll(params, CONFIG, np.arange(50) % 53, context=32)
