"""The TurboQuant KV cache: packed codes behind the float cache's interface, its size, its
closeness to the float cache on a trained model, the exact window, seeds and errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2jax.attention import heads_to_rows, masked_attention
from gpt2jax.cache import init_cache, init_turboquant_cache, turboquant_quantizers
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate
from gpt2jax.model import apply, init_params
from gpt2jax.quant.turboquant import (
    OutlierSplit,
    TurboQuantConfig,
    mse_distortion,
    quarter_split,
)

# head_dim 64, GPT-2's
TINY = dict(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=128)


def _model(seed=0, **changes):
    config = GPTConfig(**{**TINY, **changes})
    return config, init_params(config, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=3)
def _step(params, tokens, cache, config):
    return apply(params, tokens, config, cache=cache)


def _float_leaves_of_shape(tree, shape):
    return [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating) and x.shape == shape]


# ---------------------------------------------------------------------------- storage


def test_3_bit_cache_takes_under_a_4_5th_of_float16_and_holds_codes():
    config, params = _model()
    B, S, N, D = 2, 64, 2 * config.n_head, config.head_dim
    cache = init_turboquant_cache(config, B, S, TurboQuantConfig(bits=3))
    half = init_cache(config, B, S, jnp.float16)
    measured = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    assert cache.nbytes == measured
    # 24 code bytes + a 2-byte norm per 64-dim vector against 128: 4.92x
    assert measured * 4.5 <= half.nbytes, (measured, half.nbytes)

    tokens = jax.random.randint(jax.random.key(1), (B, 20), 0, config.vocab_size)
    _, cache = _step(params, tokens, cache, config)
    assert _float_leaves_of_shape(cache, (N, S, D)) == []  # codes, not reconstructions
    for codes in cache.k + cache.v:
        assert codes.idx.dtype == jnp.uint8 and codes.idx.shape == (N, S, 3 * D // 8)
        assert codes.norm.dtype == jnp.float16
        assert (np.asarray(codes.idx[:, :20]) != 0).any()  # written...
        assert not np.asarray(codes.idx[:, 20:]).any()  # ...at the right offsets only


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_codes_are_the_quantized_post_rope_keys_and_values(pos):
    config, params = _model(pos_embedding=pos)
    B, T, S = 2, 11, 32
    tq_config = TurboQuantConfig(bits=4, key_quantizer="prod")
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    _, floats = _step(params, tokens, init_cache(config, B, S), config)
    _, coded = _step(params, tokens, init_turboquant_cache(config, B, S, tq_config), config)
    # Layer 0 sees the same input in both runs: its codes are those of the float cache's
    # keys (stored after RoPE) and values. Allow a few index flips for a rounding-level
    # difference in how the two programs compute k.
    k_quantizer, v_quantizer = coded.quantizers(0)
    for quantizer, x_BHSD, codes in [(k_quantizer, floats.k[0], coded.k[0]),
                                     (v_quantizer, floats.v[0], coded.v[0])]:
        want = quantizer.quantize(x_BHSD.reshape(B * config.n_head, S, -1)[:, :T])  # its rows
        got = jax.tree.map(lambda a: a[:, :T], codes)
        for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got),
                        strict=True):
            if jnp.issubdtype(w.dtype, jnp.floating):
                np.testing.assert_allclose(g, w, rtol=2e-3)
            else:
                assert np.mean(np.asarray(g) == np.asarray(w)) >= 0.99


# ---------------------------------------------------------------------------- the window


def _prefill_then_decode(params, config, cache, tokens_BT, prompt_lens):
    """Logits of a ragged prefill (rows rewound to their prompt lengths) then decode steps
    fed from tokens_BT, as generate runs them."""
    B, T = tokens_BT.shape
    P = int(prompt_lens.max())
    logits, cache = _step(params, tokens_BT[:, :P], cache, config)
    out = [logits]
    cache = cache.replace(lengths=jnp.asarray(prompt_lens, jnp.int32))
    for j in range(T - P):
        logits, cache = _step(params, tokens_BT[np.arange(B), prompt_lens + j][:, None], cache,
                              config)
        out.append(logits)
    return out


@pytest.mark.parametrize("pos,key_quantizer", [("learned", "mse"), ("rope", "prod")])
def test_a_window_covering_the_cache_equals_the_float_cache(pos, key_quantizer):
    config, params = _model(pos_embedding=pos)
    S = 16
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, config.vocab_size)
    lens = np.array([6, 3])
    want = _prefill_then_decode(params, config, init_cache(config, 2, S), tokens, lens)
    # 1 bit: any key read from its codes would show
    tq_config = TurboQuantConfig(bits=1, key_quantizer=key_quantizer, window=S + 5)
    got = _prefill_then_decode(params, config, init_turboquant_cache(config, 2, S, tq_config),
                               tokens, lens)
    scale = max(np.abs(w).max() for w in want)
    worst = max(np.abs(np.asarray(g) - np.asarray(w)).max() for g, w in zip(got, want, strict=True))
    # measured: bitwise equal; the same 1-bit cache without its window is off by 0.27-0.30
    assert worst <= 1e-6 * scale, worst / scale


def test_window_reads_the_slots_it_still_holds_and_codes_for_the_rest():
    """Against a reference: the chunk's own keys/values exact, stored ones exact where the
    ring (simulated here) still holds their position and dequantized codes elsewhere, then
    float attention: the code-domain scores and value sums match dequantize-then-matmul."""
    config = GPTConfig(**{**TINY, "n_layer": 1, "n_embd": 64})  # head_dim 32
    B, H, D, S, W = 2, config.n_head, config.head_dim, 16, 4
    cache = init_turboquant_cache(config, B, S, TurboQuantConfig(bits=2, window=W))
    k_quantizer, v_quantizer = cache.quantizers(0)
    truth = {"k": np.zeros((B, S, H, D), np.float32), "v": np.zeros((B, S, H, D), np.float32)}
    ring = [dict() for _ in range(B)]  # slot -> position, per row
    rng = np.random.default_rng(0)
    write = jax.jit(lambda c, k, v: c.write(0, k, v))
    attend = jax.jit(lambda c, q, pos, k, v: c.attend(0, q, pos, k, v))

    def put(cache, T):
        k, v = (rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(2))
        for b in range(B):
            start = int(cache.lengths[b])
            truth["k"][b, start:start + T], truth["v"][b, start:start + T] = k[b], v[b]
            for p in range(start + max(T - W, 0), start + T):  # a chunk's last W tokens
                ring[b][p % W] = p
        return write(cache, jnp.asarray(k), jnp.asarray(v)), k, v

    def check(cache, T, k, v):
        q = rng.normal(size=(B, T, H, D)).astype(np.float32)
        start = np.asarray(cache.lengths)
        q_pos = start[:, None] + np.arange(T)
        held = np.array([[ring[b].get(s % W) == s for s in range(S)] for b in range(B)])
        exact = held | (np.arange(S)[None, :] >= start[:, None])  # the chunk: exact
        eff = {}
        for name, quantizer in [("k", k_quantizer), ("v", v_quantizer)]:
            rows = heads_to_rows(jnp.asarray(truth[name]))
            coded = np.asarray(quantizer.dequantize(quantizer.quantize(rows)))
            eff[name] = np.where(np.repeat(exact, H, axis=0)[:, :, None], rows, coded)
        mask = np.arange(S)[None, None, :] <= q_pos[:, :, None]
        as_heads = lambda rows: jnp.asarray(rows).reshape(B, H, S, D)
        want = masked_attention(jnp.asarray(q), as_heads(eff["k"]), as_heads(eff["v"]),
                                jnp.asarray(mask))
        got = attend(cache, jnp.asarray(q), jnp.asarray(q_pos, jnp.int32), k, v)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        return held

    cache, k, v = put(cache, 10)  # a prefill longer than the window
    check(cache, 10, k, v)
    cache = cache.replace(lengths=jnp.array([10, 6], jnp.int32))  # row 1: 4 tokens of pad
    for _ in range(3):
        cache, k, v = put(cache, 1)
        held = check(cache, 1, k, v)
        cache = cache.advance(1)
    # row 0 holds its last 4 positions; row 1's pad at 9 still evicts prompt position 5
    assert held[0].nonzero()[0].tolist() == [9, 10, 11, 12]
    assert held[1].nonzero()[0].tolist() == [6, 7, 8, 9]


def test_decode_reads_the_smallest_prefix_holding_every_stored_position(monkeypatch):
    """Decode attention reads the codes up to the smallest of `prefix_buckets` that holds
    every row's stored positions: equal to reading all max_len slots (to float rounding).
    The lengths sit at the edges (65 needs 128, 130 needs 256): a bucket one too small would
    drop a stored key and move the output far past the tolerance."""
    from gpt2jax.cache import turboquant as tq_cache

    assert tq_cache.prefix_buckets(512) == (64, 128, 256, 512)
    assert tq_cache.prefix_buckets(1088)[-2:] == (1024, 1088)
    assert tq_cache.prefix_buckets(16) == (16,)
    config = GPTConfig(**{**TINY, "n_layer": 1, "n_embd": 64, "block_size": 512})
    B, H, D, S = 2, config.n_head, config.head_dim, 512
    rng = np.random.default_rng(0)
    normal = lambda T: jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k, v = normal(130), normal(130)
    attend = lambda c, q, k1, v1: c.attend(0, q, c.lengths[:, None], k1, v1)
    for lengths in ([10, 40], [65, 3], [130, 129]):  # buckets 64, 128, 256
        cache = init_turboquant_cache(config, B, S, TurboQuantConfig(bits=3)).write(0, k, v)
        cache = cache.replace(lengths=jnp.array(lengths, jnp.int32))
        q, k1, v1 = normal(1), normal(1), normal(1)
        cache = cache.write(0, k1, v1)
        prefix = attend(cache, q, k1, v1)  # eager: jit would reuse one trace for both
        with monkeypatch.context() as m:
            m.setattr(tq_cache, "prefix_buckets", lambda max_len: (max_len,))
            whole = attend(cache, q, k1, v1)
        np.testing.assert_allclose(prefix, whole, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- outliers


def _keys_with_hot_channels(key, B, T, H, D, n_hot, scale=8.0):
    """Keys [B, T, H, D] whose energy sits in n_hot channels drawn at random per (row, head);
    and those channel sets [B, H, n_hot]."""
    k_perm, k_x = jax.random.split(key)
    hot_BHn = jnp.argsort(jax.random.uniform(k_perm, (B, H, D)), axis=-1)[..., :n_hot]
    gain_BHD = jnp.ones((B, H, D)).at[
        jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], hot_BHn].set(scale)
    return jax.random.normal(k_x, (B, T, H, D)) * gain_BHD[:, None], hot_BHn


@pytest.mark.parametrize("per", ["head", "layer"])
def test_prefill_selects_the_hot_channels_and_the_split_beats_the_lower_rate(per):
    config = GPTConfig(**{**TINY, "n_layer": 1})
    B, T, H, D = 2, 48, config.n_head, config.head_dim
    split = quarter_split(2, D)
    k_BTHD, hot_BHn = _keys_with_hot_channels(jax.random.key(3), B, T, H, D, split.n_outlier)
    if per == "layer":  # one channel set per (sequence, layer): every head of a row shares it
        k_BTHD, hot_BHn = _keys_with_hot_channels(jax.random.key(3), B, T, 1, D, split.n_outlier)
        k_BTHD, hot_BHn = jnp.tile(k_BTHD, (1, 1, H, 1)), jnp.tile(hot_BHn, (1, H, 1))
    tq_config = TurboQuantConfig(bits=2, outlier=split, outlier_select=per)
    write = jax.jit(lambda c, k: c.write(0, k, k))
    cache = write(init_turboquant_cache(config, B, 64, tq_config), k_BTHD)
    chosen = np.asarray(cache.k_perm[0][:, 0, :split.n_outlier]).reshape(B, H, -1)
    for b in range(B):
        for h in range(H):
            assert set(chosen[b, h].tolist()) == set(np.asarray(hot_BHn[b, h]).tolist())
    # a later write (a decode step) keeps the prompt's choice
    moved = write(cache.advance(T), k_BTHD[:, :1] * 0 + 1.0)
    np.testing.assert_array_equal(moved.k_perm[0], cache.k_perm[0])

    q_NTD = jax.random.normal(jax.random.key(4), (B * H, 8, D))
    k_NTD = heads_to_rows(k_BTHD)
    exact = jnp.einsum("NQD,NTD->NQT", q_NTD, k_NTD)

    def score_error(quantizer):
        approx = quantizer.scores(quantizer.prepare_query(q_NTD), quantizer.quantize(k_NTD))
        return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))

    selected = score_error(cache.quantizers(0)[0])
    first = score_error(turboquant_quantizers(tq_config, D, 0)[0])  # channels 0..15
    plain = score_error(turboquant_quantizers(TurboQuantConfig(bits=2), D, 0)[0])
    # the extra bit on the energetic channels pays; on channels 0..15 it does not
    assert selected < plain and selected < first, (selected, plain, first)


# ---------------------------------------------------------------------------- a trained model

PERIOD, PATTERN_VOCAB, SEQ = 32, 16, 64


def _pattern_windows(pattern, rng, n, length):
    """n windows of the repeated pattern at random phases."""
    start = rng.integers(0, len(pattern), n)
    return pattern[(start[:, None] + np.arange(length)) % len(pattern)]


@pytest.fixture(scope="module")
def trained():
    """A 2-layer RoPE model that learns a fixed period-32 sequence over 16 tokens: to predict
    it must find its phase by attending to the last few tokens. 100 Adam steps of 8 rows:
    loss ~0.03."""
    config, params = _model(pos_embedding="rope", vocab_size=PATTERN_VOCAB, block_size=SEQ)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, PATTERN_VOCAB, PERIOD)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def update(params, state, batch_BT):
        def loss(params):
            logits = apply(params, batch_BT[:, :-1], config)[0]
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, batch_BT[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = optimizer.init(params)
    for _ in range(100):
        params, state, loss = update(
            params, state, jnp.asarray(_pattern_windows(pattern, rng, 8, SEQ + 1)))
    assert loss < 0.2, f"the pattern was not learned: loss {loss:.3f}"
    return config, params, pattern, rng


def _prefill_and_step(params, config, cache, tokens_BT, prompt: int):
    """Logits [B, T, V]: a prefill of `prompt` tokens, then one decode step per token."""
    logits, cache = _step(params, tokens_BT[:, :prompt], cache, config)
    out = [logits]
    for t in range(prompt, tokens_BT.shape[1]):
        logits, cache = _step(params, tokens_BT[:, t:t + 1], cache, config)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


def test_prefill_is_exact_and_decode_logits_are_close_and_improve_with_bits(trained):
    config, params, pattern, rng = trained
    tokens = jnp.asarray(_pattern_windows(pattern, rng, 4, SEQ))
    P = SEQ // 2
    want = _prefill_and_step(params, config, init_cache(config, 4, SEQ), tokens, P)
    errors = {}
    for bits in (2, 3, 4):
        cache = init_turboquant_cache(config, 4, SEQ, TurboQuantConfig(bits=bits))
        got = _prefill_and_step(params, config, cache, tokens, P)
        # the prompt attends to its own exact keys and values: float rounding only
        np.testing.assert_allclose(got[:, :P], want[:, :P], atol=1e-5, rtol=1e-5)
        errors[bits] = float(jnp.linalg.norm(got[:, P:] - want[:, P:])
                             / jnp.linalg.norm(want[:, P:]))
    # Bound: one 4-bit vector's own relative error, sqrt(D_mse(64, 4)) = 0.095: the cache
    # may not amplify it (decode steps read the prompt's codes and their own exact k/v).
    assert errors[4] <= mse_distortion(config.head_dim, 4) ** 0.5, errors
    assert errors[4] < errors[3] < errors[2], errors


def test_greedy_tokens_mostly_equal_the_float_cache(trained):
    config, params, pattern, rng = trained
    lengths = [20, 13, 24, 9]
    windows = _pattern_windows(pattern, rng, len(lengths), SEQ)
    prompts = [list(w[:n]) for w, n in zip(windows, lengths, strict=True)]
    run = lambda kv_cache: np.asarray(generate(
        params, config, prompts, max_new_tokens=32, key=jax.random.key(0), temperature=0.0,
        kv_cache=kv_cache))
    floats = run(None)
    continuation = np.stack([w[n:n + 32] for w, n in zip(windows, lengths, strict=True)])
    assert np.mean(floats == continuation) >= 0.9  # the model decodes the pattern
    # measured agreement: 1.0 down to 2 bits; 0.69 (mse) and 0.78 (prod) at 1 bit
    for tq_config in (TurboQuantConfig(bits=4), TurboQuantConfig(bits=3, key_quantizer="prod")):
        assert np.mean(run(tq_config) == floats) >= 0.9, tq_config


# ---------------------------------------------------------------------------- seeds, traces


def test_same_seed_same_tokens_one_trace_other_seed_other_codes(apply_traces):
    config, params = _model(vocab_size=83)  # a config no other test compiles for
    kwargs = dict(max_new_tokens=8, key=jax.random.key(4), temperature=1.0,
                  kv_cache=TurboQuantConfig(bits=2, seed=7, outlier=quarter_split(2, 64)))
    first = np.asarray(generate(params, config, [[3, 1, 4, 1, 5]], **kwargs))
    count = len(apply_traces)
    assert count > 0
    generate(params, config, [[3, 1, 4]], **kwargs)  # another length of the bucket
    np.testing.assert_array_equal(generate(params, config, [[3, 1, 4, 1, 5]], **kwargs), first)
    assert len(apply_traces) == count

    tokens = jnp.asarray([[3, 1, 4, 1, 5]])
    codes = {seed: _step(params, tokens, init_turboquant_cache(
        config, 1, 16, TurboQuantConfig(bits=2, seed=seed)), config)[1].k[0].idx
        for seed in (7, 8)}
    assert (np.asarray(codes[7]) != np.asarray(codes[8])).any()
    # one rotation per layer, the same object on every call
    tq_config = TurboQuantConfig(bits=2, seed=7)
    layer0, layer1 = (turboquant_quantizers(tq_config, config.head_dim, i)[0] for i in (0, 1))
    assert turboquant_quantizers(tq_config, config.head_dim, 0)[0] is layer0
    assert not np.allclose(layer0.rotation, layer1.rotation)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kv_cache=TurboQuantConfig(), use_cache=False),
         r"kv_cache=TurboQuantConfig\(.*needs use_cache=True.*drop kv_cache"),
        (dict(kv_cache="int8"),
         r"kv_cache='int8' is invalid: use None .*'bfloat16'.*TurboQuantConfig\(bits=...\)"),
        (dict(kv_cache=TurboQuantConfig(bits=2, outlier=OutlierSplit(31, 3, 2))),
         r"n_outlier=31 does not fit head dim d=32.*use n_outlier <= 30"),
    ],
)
def test_bad_kv_cache_is_named_before_any_compute(kwargs, message):
    config = GPTConfig(**{**TINY, "n_embd": 64})  # head_dim 32; no parameters needed
    with pytest.raises(ValueError, match=message):
        generate(None, config, [[1, 2]], max_new_tokens=4, key=jax.random.key(0), **kwargs)


def test_bad_turboquant_configs_are_named():
    config = GPTConfig(**TINY)
    with pytest.raises(ValueError, match=r"bits=5 is invalid: use an integer in 1..4"):
        TurboQuantConfig(bits=5)
    with pytest.raises(ValueError, match=r"window=-1 is invalid"):
        TurboQuantConfig(window=-1)
    with pytest.raises(ValueError, match=r"tq_config=3 is invalid: pass a TurboQuantConfig"):
        init_turboquant_cache(config, 1, 8, 3)
    with pytest.raises(ValueError, match=r"max_len=65 exceeds block_size=64"):
        init_turboquant_cache(config, 1, 65, TurboQuantConfig())
