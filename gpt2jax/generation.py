"""Text generation: one jitted function, a batched prefill then `lax.scan` over decode steps.
`generate_stream` runs the same prefill and decode scan as separate jitted calls, one
`lax.scan` of `chunk_size` steps per chunk, and yields the tokens as they come.

Shapes are bucketed so that few programs are compiled: prompts are right-padded to a power
of two (at least 16), and the cache (or the no-cache token buffer) holds that bucket plus
max_new_tokens, rounded up to a multiple of 16; both are capped at block_size for learned
positions. `temperature` and `top_p` are traced values, so changing them (or the key, or the
prompt length within its bucket) reuses the compiled program; `top_k`, `max_new_tokens`,
the batch size and whether top-p filtering is on at all are static.

A ragged batch is prefilled right-padded; then each row's length is set to its own prompt
length, so decoding writes row b's next key at lengths[b] and the causal mask (key position
<= query position) hides the pad that the prefill left behind it.

`kv_cache` picks the cache kind (`cache.make_cache`): None (float in the model's dtype),
"float32" / "bfloat16" / "float16", or a `TurboQuantConfig` (keys and values stored as
TurboQuant codes). It is static: each kind is its own program, the decode scan the same.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.cache import check_cache_kind, make_cache
from gpt2jax.config import GPTConfig
from gpt2jax.model import apply

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def sample_logits(logits_BV, key, temperature, top_k: int | None = None, top_p=None):
    """Next token ids int32 [B] from float logits [B, V].

    temperature (traced): 0 means greedy (argmax). top_k (static): keep the k largest.
    top_p (traced, or None for no nucleus filter): keep the most likely tokens whose mass
    reaches top_p (the most likely token always stays).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = argmax(logits_BV)
    scaled_BK = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
    ids_BK = None
    if top_k is not None:
        scaled_BK, ids_BK = jax.lax.top_k(scaled_BK, top_k)
    probs_BK = jax.nn.softmax(scaled_BK, axis=-1)
    if top_p is not None:
        probs_BK = jnp.where(probs_BK >= nucleus_threshold(probs_BK, top_p), probs_BK, 0.0)
    choice_B = inverse_cdf(probs_BK, jax.random.uniform(key, (probs_BK.shape[0], 1)))
    if ids_BK is not None:
        choice_B = jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, choice_B, greedy_B).astype(jnp.int32)


def argmax(x_BV):
    """First index of the maximum. XLA CPU's variadic argmax reduction is 3-8x slower."""
    top_B1 = x_BV.max(axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_BV == top_B1, jnp.arange(x_BV.shape[-1]), x_BV.shape[-1]), -1)


def inverse_cdf(weights_BK, u_B1):
    """An index drawn with probability proportional to weights >= 0, from one uniform
    u in [0, 1) per row.

    Gumbel-max (`jax.random.categorical`) needs V random numbers per row: 1.7 ms of a
    ~15 ms decode step at V=50257 on CPU, against 0.25 ms for this."""
    cdf_BK = jnp.cumsum(weights_BK, axis=-1)
    u_B1 = u_B1 * cdf_BK[:, -1:]
    # the first index whose cdf exceeds u; zero-weight entries are never picked
    return jnp.minimum(jnp.sum(cdf_BK <= u_B1, axis=-1), weights_BK.shape[-1] - 1)


def nucleus_threshold(probs_BK, top_p, iters: int = 32):
    """[B, 1] the largest t such that the tokens with prob >= t hold mass >= top_p (a scalar
    or one per row, [B, 1]).

    Bisection instead of a sort: argsort over 50257 entries costs 9 ms per step on CPU,
    32 masked sums 0.15 ms. It keeps exactly the sorted-cumsum nucleus unless a prob lies
    within max_prob / 2**32 below the threshold."""
    lo_B1 = jnp.zeros_like(probs_BK[:, :1])  # mass(prob >= 0) = 1 >= top_p
    hi_B1 = probs_BK.max(axis=-1, keepdims=True)

    def halve(_, bounds):
        lo_B1, hi_B1 = bounds
        mid_B1 = (lo_B1 + hi_B1) / 2
        ok_B1 = jnp.where(probs_BK >= mid_B1, probs_BK, 0.0).sum(-1, keepdims=True) >= top_p
        return jnp.where(ok_B1, mid_B1, lo_B1), jnp.where(ok_B1, hi_B1, mid_B1)

    lo_B1 = jax.lax.fori_loop(0, iters, halve, (lo_B1, hi_B1))[0]
    return jnp.where(top_p >= 1, 0.0, lo_B1)  # a float32 sum may round a tiny tail away


# ---------------------------------------------------------------------------- validation


def _prepare(prompts, config: GPTConfig, max_new_tokens, temperature, top_k, top_p, eos_id):
    """Check every argument before any compute; return (tokens_BP, lengths_B, max_len)."""
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise ValueError(
            f"prompts must be a list of token-id lists, got {type(prompts).__name__}: encode "
            f"text first (gpt2jax.tokenizer.encode) and wrap it as [ids]")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt, e.g. [[50256]]")
    rows = []
    for b, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(
                f"prompts[{b}] must be a flat list of integer token ids, got "
                f"{type(prompt).__name__} of shape {ids.shape} and dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(
                f"prompts[{b}] is empty: every prompt needs at least one token (start from "
                f"<|endoftext|> = 50256 for unconditional samples)")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(
                f"prompts[{b}] holds token id {lo if lo < 0 else hi}, out of range "
                f"[0, {config.vocab_size}) for vocab_size={config.vocab_size}: check the "
                f"tokenizer matches the model")
        rows.append(ids.astype(np.int32))
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
    if top_k is not None and not (isinstance(top_k, int | np.integer)
                                  and 1 <= top_k <= config.vocab_size):
        raise ValueError(
            f"top_k={top_k!r} must be an integer in [1, vocab_size={config.vocab_size}] or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] or None")
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ValueError(
            f"eos_id={eos_id!r} is out of range [0, {config.vocab_size}): pass a token id of "
            f"the model's vocabulary (GPT-2: 50256) or None")

    longest = max(len(r) for r in rows)
    if config.pos_embedding == "learned" and longest + max_new_tokens > config.block_size:
        fixes = [f"shorten the prompt to {config.block_size - max_new_tokens} tokens"
                 ] if max_new_tokens < config.block_size else []
        if longest < config.block_size:
            fixes.append(f"lower max_new_tokens to {config.block_size - longest}")
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds block_size={config.block_size}, the most "
            f"positions learned embeddings (wpe) can encode: "
            f"{' or '.join(fixes) or 'shorten both'}")
    if config.pos_embedding != "learned" and longest + max_new_tokens > config.block_size:
        warnings.warn(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
            f"{longest + max_new_tokens} positions runs past block_size={config.block_size}, "
            f"the context the model was trained at: {config.pos_embedding} positions go on, "
            f"but expect the text to degrade past {config.block_size} tokens",
            stacklevel=4)
    # Learned positions stop at block_size: so do the buckets (the check above keeps every
    # real token below it). The cache length depends on the prompt bucket and
    # max_new_tokens only, so every prompt length in a bucket shares one program.
    cap = config.block_size if config.pos_embedding == "learned" else None
    prompt_len = min(bucket(longest), cap or bucket(longest))
    # The last new token is returned, never fed back: its key/value is never stored.
    max_len = -(-(prompt_len + max_new_tokens - 1) // MIN_BUCKET) * MIN_BUCKET
    max_len = min(max_len, cap or max_len)
    tokens_BP = np.zeros((len(rows), prompt_len), np.int32)
    for b, r in enumerate(rows):
        tokens_BP[b, : len(r)] = r
    return tokens_BP, np.array([len(r) for r in rows], np.int32), max_len


# ---------------------------------------------------------------------------- generation


def _setup(prompts, config: GPTConfig, max_new_tokens, temperature, top_k, top_p, eos_id,
           use_cache, kv_cache):
    """Every argument checked: (tokens_BP, lengths_B, the traced sampling values, the static
    arguments of prefill and decode alike, and the prefill's cache shape and kind)."""
    tokens_BP, lengths_B, max_len = _prepare(
        prompts, config, max_new_tokens, temperature, top_k, top_p, eos_id)
    if kv_cache is not None and not use_cache:
        raise ValueError(
            f"kv_cache={kv_cache!r} needs use_cache=True: the no-cache path stores no keys; "
            f"drop kv_cache or set use_cache=True")
    check_cache_kind(kv_cache, config)
    sampling = (jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p),
                jnp.int32(-1 if eos_id is None else eos_id))
    static = dict(config=config, top_k=None if top_k is None else int(top_k),
                  nucleus=top_p is not None, use_cache=use_cache)
    return tokens_BP, lengths_B, sampling, static, dict(max_len=max_len, kv_cache=kv_cache)


def generate(params, config: GPTConfig, prompts, *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, use_cache: bool = True, kv_cache=None) -> jax.Array:
    """Continue each prompt by `max_new_tokens` tokens: int32 [batch, max_new_tokens].

    prompts: list of token-id lists, lengths may differ (a ragged batch). key: PRNG key;
    the same key gives the same samples. temperature 0 is greedy. Once a row emits `eos_id`
    it keeps emitting it. `use_cache=False` is the reference path: the full forward over a
    fixed-size token buffer at every step, giving the same tokens more slowly. `kv_cache`:
    what the cache stores (module docstring), e.g. `TurboQuantConfig(bits=3)`.
    """
    tokens_BP, lengths_B, sampling, static, cache = _setup(
        prompts, config, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, kv_cache)
    return _generate(params, tokens_BP, lengths_B, key, sampling,
                     max_new_tokens=int(max_new_tokens), **static, **cache)


def generate_stream(params, config: GPTConfig, prompts, *, max_new_tokens: int, key,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None,
                    use_cache: bool = True, kv_cache=None,
                    chunk_size: int = 16) -> Iterator[np.ndarray]:
    """`generate`, delivered as it goes: int32 numpy arrays [batch, n] whose concatenation is
    `generate`'s tokens for the same arguments.

    The first chunk is the prefill's token (n = 1); then each chunk is one call of a jitted
    `lax.scan` over `chunk_size` decode steps carrying the cache, so every full chunk reuses
    one compiled program (the last, shorter one compiles its own). With `eos_id`, the stream
    ends early once every row has emitted it (generate would pad the rest with eos_id).
    Arguments are checked here, before the first chunk is asked for."""
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    tokens_BP, lengths_B, sampling, static, cache = _setup(
        prompts, config, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, kv_cache)

    def chunks():
        carry = _prefill_jit(params, tokens_BP, lengths_B, key, sampling, **static, **cache)
        yield np.asarray(carry[1])[:, None]
        left = int(max_new_tokens) - 1
        while left > 0 and not (eos_id is not None and np.asarray(carry[3]).all()):
            carry, toks_BN = _decode_jit(params, carry, sampling, steps=min(chunk_size, left),
                                         **static)
            left -= toks_BN.shape[1]
            yield np.asarray(toks_BN)

    return chunks()


def _pick(logits_BV, key, done_B, sampling, top_k, nucleus):
    """Sample, then pin finished rows to eos_id (eos_id = -1 never matches)."""
    temperature, top_p, eos_id = sampling
    tok_B = sample_logits(logits_BV, key, temperature, top_k, top_p if nucleus else None)
    tok_B = jnp.where(done_B, eos_id, tok_B)
    return tok_B, done_B | (tok_B == eos_id)


def _prefill(params, tokens_BP, lengths_B, key, sampling, *, config, max_len, top_k,
             nucleus, use_cache, kv_cache):
    """The prompts through the model and the first new token: the decode carry
    (state, tok_B, key, done_B), state being the cache or the no-cache token buffer."""
    B, P = tokens_BP.shape
    last_B1 = (lengths_B - 1)[:, None]  # index of each row's last prompt token
    if use_cache:
        cache = make_cache(config, B, max_len, kv_cache)
        logits_B1V, cache = apply(params, tokens_BP, config, cache=cache, logits_at=last_B1)
        state = cache.replace(lengths=lengths_B)  # rows continue after their own prompt
    else:
        buf_BS = jnp.zeros((B, max_len), jnp.int32).at[:, :P].set(tokens_BP)
        logits_B1V, _ = apply(params, buf_BS, config, logits_at=last_B1)
        state = (buf_BS, lengths_B)
    key, sub = jax.random.split(key)
    tok_B, done_B = _pick(logits_B1V[:, 0], sub, jnp.zeros((B,), bool), sampling, top_k, nucleus)
    return state, tok_B, key, done_B


def _decode(params, carry, sampling, *, config, steps, top_k, nucleus, use_cache):
    """`steps` decode steps from `carry` in one `lax.scan`: (carry, tokens int32 [B, steps])."""

    def next_logits(state, tok_B):
        if use_cache:
            logits_B1V, state = apply(params, tok_B[:, None], config, cache=state)
            return logits_B1V[:, 0], state
        buf_BS, lengths_B = state
        buf_BS = buf_BS.at[jnp.arange(buf_BS.shape[0]), lengths_B].set(tok_B)
        logits_B1V, _ = apply(params, buf_BS, config, logits_at=lengths_B[:, None])
        return logits_B1V[:, 0], (buf_BS, lengths_B + 1)

    def step(carry, _):
        state, tok_B, key, done_B = carry
        logits_BV, state = next_logits(state, tok_B)
        key, sub = jax.random.split(key)
        tok_B, done_B = _pick(logits_BV, sub, done_B, sampling, top_k, nucleus)
        return (state, tok_B, key, done_B), tok_B

    carry, toks_NB = jax.lax.scan(step, carry, length=steps)
    return carry, toks_NB.T


_STATIC = ("config", "top_k", "nucleus", "use_cache")
_prefill_jit = jax.jit(_prefill, static_argnames=(*_STATIC, "max_len", "kv_cache"))
# the carry is donated: each chunk updates the cache buffers in place
_decode_jit = jax.jit(_decode, static_argnames=(*_STATIC, "steps"), donate_argnums=1)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_len", "kv_cache", "max_new_tokens"))
def _generate(params, tokens_BP, lengths_B, key, sampling, *, config, max_new_tokens, max_len,
              top_k, nucleus, use_cache, kv_cache):
    carry = _prefill(params, tokens_BP, lengths_B, key, sampling, config=config,
                     max_len=max_len, top_k=top_k, nucleus=nucleus, use_cache=use_cache,
                     kv_cache=kv_cache)
    _, rest_BN = _decode(params, carry, sampling, config=config, steps=max_new_tokens - 1,
                         top_k=top_k, nucleus=nucleus, use_cache=use_cache)
    return jnp.concatenate([carry[1][:, None], rest_BN], axis=1)
