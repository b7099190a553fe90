"""The KV cache: decoding through it gives the full forward's logits, for every variant."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.cache import init_cache
from gpt2jax.config import NORM_PLACEMENTS, POS_EMBEDDINGS, GPTConfig
from gpt2jax.model import apply, init_params

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)


@functools.partial(jax.jit, static_argnums=2)
def _full(params, tokens, config):
    return apply(params, tokens, config)[0]


@functools.partial(jax.jit, static_argnums=3)
def _step(params, tokens, cache, config):
    return apply(params, tokens, config, cache=cache)


@pytest.mark.parametrize("pos,placement", list(itertools.product(POS_EMBEDDINGS, NORM_PLACEMENTS)))
def test_ragged_prefill_then_decode_equals_full_forward(pos, placement):
    _check_ragged_decode(GPTConfig(**TINY, pos_embedding=pos, norm_placement=placement))


def test_cache_without_the_cpu_layouts_equals_full_forward(monkeypatch):
    """Off CPU the cache is written and read as [B, H, S, D] directly, no rows."""
    from gpt2jax import backend

    monkeypatch.setattr(backend, "cpu_layouts", lambda: False)
    jax.clear_caches()  # programs traced with the CPU layouts must not be reused
    try:
        _check_ragged_decode(GPTConfig(**TINY, pos_embedding="rope"))
    finally:
        jax.clear_caches()


def _check_ragged_decode(config):
    pos, placement = config.pos_embedding, config.norm_placement
    params = init_params(config, jax.random.key(0))
    B, T = 2, 12
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    full = np.asarray(_full(params, tokens, config))  # rows are independent sequences

    # Row 0 has a 5-token prompt, row 1 a 3-token one: prefill both right-padded to 5, then
    # rewind row 1 to its own length so decoding overwrites the pad.
    prompt_lens = np.array([5, 3])
    cache = init_cache(config, B, 16)
    prefill, cache = _step(params, tokens[:, :5], cache, config)
    cache = cache.replace(lengths=jnp.asarray(prompt_lens, jnp.int32))
    got = {(b, t): np.asarray(prefill[b, t]) for b in range(B) for t in range(prompt_lens[b])}
    for j in range(T - prompt_lens.min()):
        pos_B = np.minimum(prompt_lens + j, T - 1)  # row 0 finishes first: repeat its last
        logits, cache = _step(params, tokens[np.arange(B), pos_B][:, None], cache, config)
        for b in range(B):
            got[(b, int(pos_B[b]))] = np.asarray(logits[b, 0])
        cache = cache.replace(lengths=jnp.asarray(np.minimum(prompt_lens + j + 1, T - 1)))
    assert len(got) == B * T
    scale = np.abs(full).max()
    worst = max(np.abs(got[key] - full[key]).max() for key in got) / scale
    assert worst <= 1e-5, f"{pos}/{placement}: cached logits off by {worst:.2e} of the scale"


def test_params_are_per_layer_as_hugging_face_names_them():
    config = GPTConfig(**TINY, pos_embedding="rope")
    params = init_params(config, jax.random.key(0))
    assert sorted(params["h"]) == [str(i) for i in range(config.n_layer)]
    assert params["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (config.n_embd,
                                                                   3 * config.n_embd)
    assert not np.array_equal(params["h"]["0"]["attn"]["c_attn"]["kernel"],
                              params["h"]["1"]["attn"]["c_attn"]["kernel"])  # own init keys


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_bytes_follow_the_formula(dtype):
    config = GPTConfig.gpt2()  # shapes only: no parameters are built
    B, S = 3, 128
    cache = jax.eval_shape(lambda: init_cache(config, B, S, dtype))
    kv_bytes = 2 * config.n_layer * B * S * config.n_embd * jnp.dtype(dtype).itemsize
    assert sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)) == (
        kv_bytes + B * 4)  # + the int32 lengths
    tiny = GPTConfig(**TINY)
    assert init_cache(tiny, B, 32, dtype).nbytes == (
        2 * tiny.n_layer * B * 32 * tiny.n_embd * jnp.dtype(dtype).itemsize + B * 4)


def test_init_cache_rejects_bad_sizes():
    config = GPTConfig(**TINY)
    with pytest.raises(ValueError, match="max_len=33 exceeds block_size=32"):
        init_cache(config, 1, 33)
    with pytest.raises(ValueError, match="batch > 0"):
        init_cache(config, 0, 8)
    assert init_cache(config.replace(pos_embedding="rope"), 1, 64).max_len == 64
