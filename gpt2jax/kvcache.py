"""The KV cache as a value: a pytree that goes into the forward and comes out updated.

Interface every cache kind implements (so attention never branches on the kind):

- `write(layer, k_BTHD, v_BTHD) -> cache`: store T new keys/values of every row at that
  row's own offset `lengths[b]` (keys arrive already rotated when RoPE is on); `layer` is a
  Python int: the model runs the layers one by one when it carries a cache;
- `attend(layer, q_BTHD, q_positions_BT, k_BTHD, v_BTHD) -> out_BTHD`: causal attention of
  the queries over everything cached for that layer (buffer index == absolute position),
  after `write` stored the chunk's k/v; a lossy cache attends to the chunk itself through
  the exact k_BTHD, v_BTHD;
- `advance(T) -> cache`: the rows' lengths grow by T once every layer has written;
- `nbytes`: the bytes its arrays hold.

Kinds: `KVCache` (float, `init_cache`) and `TurboQuantCache` (`init_turboquant_cache`: packed
TurboQuant codes, arXiv:2504.19874 Algorithms 1–2, plus an optional float window of the most
recent tokens); `make_cache` builds either from the `kv_cache` argument of `generate`.

Memory: 2 (k and v) x n_layer x batch x max_len x n_embd x bytes per element for the float
cache; TurboQuant replaces the bytes per element by `turboquant.bits_per_value / 8`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from gpt2jax.config import GPTConfig
from gpt2jax.quant.turboquant import OutlierSplit, TurboQuantConfig, outlier_permutation

CACHE_DTYPES = ("float32", "bfloat16", "float16")


def heads_to_rows(x_BTHD):
    """[B, T, H, D] -> [B*H, T, D]: one attention row per (batch, head) pair, b*H + h."""
    B, T, H, D = x_BTHD.shape
    return x_BTHD.transpose(0, 2, 1, 3).reshape(B * H, T, D)


def rows_to_heads(x_NTD, batch: int):
    """[B*H, T, D] -> [B, T, H, D], the inverse of `heads_to_rows`."""
    N, T, D = x_NTD.shape
    return x_NTD.reshape(batch, N // batch, T, D).transpose(0, 2, 1, 3)


def masked_softmax(scores_BHTS, mask_BTS, probs_dropout=None):
    """Softmax over the keys of scaled float32 scores, masked keys getting exactly 0."""
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    return probs_BHTS if probs_dropout is None else probs_dropout(probs_BHTS)


def masked_attention(q_BTHD, k_NSD, v_NSD, mask_BTS, probs_dropout=None):
    """Scaled dot-product attention over keys/values in rows [B*H, S, D] (`heads_to_rows`).

    Scores and softmax in float32 whatever the inputs. The products take the key/value rows
    exactly as stored: a key operand needing a transpose (q left in [B, T, H, D]: 4x slower
    decode attention, measured) or even a reshape (it makes XLA duplicate the cache update
    and copy the buffer every step) costs more than the attention itself."""
    B, T, H, D = q_BTHD.shape
    scores_NTS = jnp.einsum(
        "NTD,NSD->NTS", heads_to_rows(q_BTHD), k_NSD, preferred_element_type=jnp.float32
    ) * D**-0.5
    probs_BHTS = masked_softmax(scores_NTS.reshape(B, H, T, -1), mask_BTS, probs_dropout)
    out_NTD = jnp.einsum(
        "NTS,NSD->NTD", probs_BHTS.reshape(B * H, T, -1).astype(v_NSD.dtype), v_NSD,
        preferred_element_type=jnp.float32,
    )
    return rows_to_heads(out_NTD, B).astype(q_BTHD.dtype)


def _cudnn_applies(dtype, head_dim: int) -> bool:
    """cuDNN's fused attention: CUDA, half-precision inputs, head dim a multiple of 8 <= 128."""
    return (jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def uses_dot_product_attention(config: GPTConfig, dropout_active: bool = False) -> bool:
    """Whether attention goes through `dot_product_attention` (config.attention_impl): always
    under 'dot_product_attention', never under 'masked', and under 'auto' where cuDNN's kernel
    applies and no attention dropout is active (it has none)."""
    if config.attention_impl == "auto":
        return not dropout_active and _cudnn_applies(config.dtype, config.head_dim)
    return config.attention_impl == "dot_product_attention"


def dot_product_attention(q_BTHD, k_BSHD, v_BSHD, mask_BTS=None):
    """`masked_attention`'s result through `jax.nn.dot_product_attention`, with keys/values in
    [B, S, H, D]: cuDNN's fused kernel where it applies, XLA's otherwise (scores and softmax in
    float32 either way). mask_BTS None means causal over the same T positions, which cuDNN
    runs without materializing a mask; a mask (a cache's) reaches cuDNN as an additive bias."""
    dtype = jnp.promote_types(q_BTHD.dtype, k_BSHD.dtype)  # a cache may hold another dtype
    out_BTHD = jax.nn.dot_product_attention(
        q_BTHD.astype(dtype), k_BSHD.astype(dtype), v_BSHD.astype(dtype),
        mask=None if mask_BTS is None else mask_BTS[:, None],
        is_causal=mask_BTS is None,
        implementation="cudnn" if _cudnn_applies(dtype, q_BTHD.shape[-1]) else "xla",
    )
    return out_BTHD.astype(q_BTHD.dtype)


def causal_mask(q_positions_BT, num_keys: int):
    """mask[b, t, s] = key position s <= query position (the buffer index is the position)."""
    return jnp.arange(num_keys)[None, None, :] <= q_positions_BT[:, :, None]


def _row_positions(lengths_B, heads: int, T: int):
    """[B*H, T] positions of T new tokens of each row: lengths[b] + t."""
    return jnp.repeat(lengths_B, heads)[:, None] + jnp.arange(T)[None, :]


def _scatter_rows(buf_tree, new_tree, index_NT):
    """buf[n, index[n, t]] = new[n, t] for every leaf pair ([N, S, ...] and [N, T, ...]);
    in place inside jit/scan. Indices >= S are dropped: callers size the cache (generate does,
    up front), and the window write drops on purpose."""
    rows_N1 = jnp.arange(index_NT.shape[0])[:, None]
    return jax.tree.map(
        lambda buf, new: buf.at[rows_N1, index_NT].set(new.astype(buf.dtype), mode="drop"),
        buf_tree, new_tree,
    )


def _write_rows(buf_NSD, new_BTHD, lengths_B):
    """Scatter new_BTHD into buf[b*H + h, lengths[b] + t]."""
    B, T, H, _ = new_BTHD.shape
    return _scatter_rows(buf_NSD, heads_to_rows(new_BTHD), _row_positions(lengths_B, H, T))


def _replace_at(items: tuple, i: int, item) -> tuple:
    return items[:i] + (item,) + items[i + 1:]


@struct.dataclass
class KVCache:
    """Full-precision cache. k, v: per layer [batch * head, max_len, head_dim] (row b*H + h);
    lengths [batch]: tokens cached per batch row.

    One buffer per layer, not one [layer, ...] stack: XLA on CPU copies a layer out of a
    stack before the matmul that reads it, while a separate rank-3 buffer is updated and
    read in place (124M decode step with 1024 cached tokens, together with the head-major
    products of `masked_attention`: 29.1 -> 24.2 ms, best of 3 on a shared 2-core CPU)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array
    dot_product: bool = struct.field(pytree_node=False, default=False)  # see attend

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def write(self, layer: int, k_BTHD, v_BTHD) -> KVCache:
        return self.replace(
            k=_replace_at(self.k, layer, _write_rows(self.k[layer], k_BTHD, self.lengths)),
            v=_replace_at(self.v, layer, _write_rows(self.v[layer], v_BTHD, self.lengths)),
        )

    def attend(self, layer: int, q_BTHD, q_positions_BT, k_BTHD=None, v_BTHD=None):
        """The chunk's own k/v (the interface's last two arguments) are read back from the
        buffers, where `write` put them exactly."""
        mask_BTS = causal_mask(q_positions_BT, self.max_len)
        if self.dot_product:  # it takes [B, S, H, D] only: the rows are copied to that
            B = q_BTHD.shape[0]
            return dot_product_attention(q_BTHD, rows_to_heads(self.k[layer], B),
                                         rows_to_heads(self.v[layer], B), mask_BTS)
        return masked_attention(q_BTHD, self.k[layer], self.v[layer], mask_BTS)

    def advance(self, num_tokens: int) -> KVCache:
        return self.replace(lengths=self.lengths + num_tokens)


def _check_size(config: GPTConfig, batch: int, max_len: int) -> None:
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got {batch=}, {max_len=}")
    if config.pos_embedding == "learned" and max_len > config.block_size:
        raise ValueError(
            f"max_len={max_len} exceeds block_size={config.block_size}: learned positions (wpe) "
            f"have no embedding beyond it; use max_len <= {config.block_size}"
        )


def init_cache(config: GPTConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zeroed buffers for `batch` rows of up to `max_len` tokens each."""
    _check_size(config, batch, max_len)
    shape = (batch * config.n_head, max_len, config.head_dim)
    # distinct buffers, not one shared: a caller may donate the cache to a jitted step
    layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return KVCache(k=layers(), v=layers(), lengths=jnp.zeros((batch,), jnp.int32),
                   dot_product=uses_dot_product_attention(config))


# ---------------------------------------------------------------------------- TurboQuant

_EMPTY = jnp.iinfo(jnp.int32).max  # the position of an empty window slot: no query sees it


@functools.cache
def turboquant_quantizers(tq_config: TurboQuantConfig, head_dim: int, layer: int):
    """(keys, values) quantizers of one layer, seeded by (seed, layer): built once per
    process, as concrete arrays even when first asked for inside a trace, so every program
    embeds the same rotations as constants."""
    with jax.ensure_compile_time_eval():
        return tq_config.make_quantizers(head_dim, stream=(layer,))


def _rows_of(x_B, heads: int):
    """[B, ...] -> [B*H, ...]: each batch row's entry for every head row b*H + h."""
    return jnp.repeat(x_B, heads, axis=0)


def _select_outliers(x_NTD, heads: int, per: str):
    """[N, 1, d] outlier-first channel order from the RMS over a chunk's vectors, per row
    b*H + h ("head") or shared by the heads of a batch row ("layer")."""
    if per == "head":
        return outlier_permutation(x_NTD)[:, None, :]
    N, T, d = x_NTD.shape
    return _rows_of(outlier_permutation(x_NTD.reshape(N // heads, heads * T, d)), heads)[:, None]


PREFIX_MIN = 64  # the shortest prefix a TurboQuant cache reads; then doubling to max_len


def prefix_buckets(max_len: int) -> tuple[int, ...]:
    """The static prefix lengths the coded attention may read: 64, 128, ... (doubling), and
    max_len itself last."""
    buckets, S = [], PREFIX_MIN
    while S < max_len:
        buckets.append(S)
        S *= 2
    return (*buckets, max_len)


def _combine(m_NT, l_NT, scores_NTS, mask_NTS):
    """Fold one part's masked scores into a softmax's running max m and normaliser l: returns
    (unnormalised probabilities [N, T, S], the factor for earlier parts' sums, m, l)."""
    scores_NTS = jnp.where(mask_NTS, scores_NTS, -jnp.inf)
    new_m_NT = jnp.maximum(m_NT, scores_NTS.max(-1))
    probs_NTS = jnp.exp(scores_NTS - new_m_NT[..., None])  # masked: exactly 0
    rescale_NT = jnp.exp(m_NT - new_m_NT)
    return probs_NTS, rescale_NT, new_m_NT, l_NT * rescale_NT + probs_NTS.sum(-1)


@struct.dataclass
class TurboQuantCache:
    """TurboQuant cache (`quant/turboquant.py`). k, v: per layer, codes pytrees (packed uint8
    indices, float16 norms) with leaves [batch * head, max_len, ...], quantized at write time.
    lengths [batch] as in `KVCache`.

    As the paper runs it: a chunk's queries attend to the chunk's own keys and values exactly
    (the prefill is exact attention; a decode step sees its own token exactly) and to the
    positions before it (< lengths) through their codes, one softmax over both parts. Scores
    come from the key codes with the query rotated once; values are summed in the rotated
    space and rotated back once; the codebook lookup is fused with the unpacking (no int32
    index copy); only the filled prefix of the codes is read, rounded up to a static length
    (`prefix_buckets`), and nothing while no row has stored positions (a prefill).

    Outliers (tq.outlier with outlier_select "head" or "layer"): k_perm, v_perm per layer
    [batch * head, 1, head_dim] int32, the outlier-first channel order that a row's first
    write (its prompt) selects by per-channel RMS and later writes keep; () otherwise.

    Window (`tq.window` > 0): k_window, v_window per layer [batch * head, W, head_dim] hold
    the exact keys/values of the W most recently written positions, position p in slot
    p % W; window_pos [batch, W] says which position each slot holds. A key is read exactly
    while its slot still holds it, from its codes otherwise (which exist for every position),
    so the window never changes what is attended to, only how precisely. In a ragged prefill a
    short row's pad also passes through the window and can evict up to (pad length) of its
    last prompt tokens until decoding overwrites the pad; those keys fall back to their codes.

    The quantizers are not fields: a static field must hash and compare, which arrays do not.
    The static `tq` config and head_dim determine them (`turboquant_quantizers`), so two caches
    of one config have one tree structure and one compiled program."""

    k: tuple
    v: tuple
    lengths: jax.Array
    k_window: tuple[jax.Array, ...]
    v_window: tuple[jax.Array, ...]
    window_pos: jax.Array | None
    k_perm: tuple[jax.Array, ...]
    v_perm: tuple[jax.Array, ...]
    tq: TurboQuantConfig = struct.field(pytree_node=False)
    head_dim: int = struct.field(pytree_node=False)

    @property
    def max_len(self) -> int:
        return jax.tree_util.tree_leaves(self.k[0])[0].shape[1]

    @property
    def window(self) -> int:
        return 0 if self.window_pos is None else self.window_pos.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def quantizers(self, layer: int):
        """(keys, values) quantizers of the layer, with the selected outlier channels."""
        k_quantizer, v_quantizer = turboquant_quantizers(self.tq, self.head_dim, layer)
        if self.k_perm:
            k_quantizer = k_quantizer.replace(perm=self.k_perm[layer])
        if self.v_perm:
            v_quantizer = v_quantizer.replace(perm=self.v_perm[layer])
        return k_quantizer, v_quantizer

    def write(self, layer: int, k_BTHD, v_BTHD) -> TurboQuantCache:
        _, T, H, _ = k_BTHD.shape
        k_NTD, v_NTD = heads_to_rows(k_BTHD), heads_to_rows(v_BTHD)
        cache = self
        fresh_N11 = _rows_of(self.lengths == 0, H)[:, None, None]  # a row's first write
        for name, x_NTD in (("k_perm", k_NTD), ("v_perm", v_NTD)):
            perms = getattr(self, name)
            if perms:
                perm = jnp.where(fresh_N11, _select_outliers(x_NTD, H, self.tq.outlier_select),
                                 perms[layer])
                cache = cache.replace(**{name: _replace_at(perms, layer, perm)})
        k_quantizer, v_quantizer = cache.quantizers(layer)
        pos_NT = _row_positions(self.lengths, H, T)
        new_k = _scatter_rows(self.k[layer], k_quantizer.quantize(k_NTD), pos_NT)
        new_v = _scatter_rows(self.v[layer], v_quantizer.quantize(v_NTD), pos_NT)
        cache = cache.replace(k=_replace_at(self.k, layer, new_k),
                              v=_replace_at(self.v, layer, new_v))
        return cache if self.window_pos is None else cache._write_window(layer, k_BTHD, v_BTHD)

    def _write_window(self, layer: int, k_BTHD, v_BTHD) -> TurboQuantCache:
        _, T, H, _ = k_BTHD.shape
        W = self.window
        pos_BT = self.lengths[:, None] + jnp.arange(T)[None, :]
        # Of a chunk longer than W only the last W tokens (earlier ones share their slots);
        # nothing past max_len, like the codes. Slot W is out of range: dropped.
        keep_BT = (jnp.arange(T)[None, :] >= T - W) & (pos_BT < self.max_len)
        slot_BT = jnp.where(keep_BT, pos_BT % W, W)
        slot_NT = jnp.repeat(slot_BT, H, axis=0)
        put = lambda bufs, new_BTHD: _replace_at(
            bufs, layer, _scatter_rows(bufs[layer], heads_to_rows(new_BTHD), slot_NT))
        return self.replace(
            k_window=put(self.k_window, k_BTHD),
            v_window=put(self.v_window, v_BTHD),
            # every layer writes the same positions: rewriting them is a no-op
            window_pos=_scatter_rows(self.window_pos, pos_BT, slot_BT),
        )

    def attend(self, layer: int, q_BTHD, q_positions_BT, k_BTHD, v_BTHD):
        """Attention of the chunk's queries over the stored positions (< lengths, from codes
        or the window) and the chunk's own exact k_BTHD, v_BTHD (the ones just written)."""
        B, T, H, D = q_BTHD.shape
        k_quantizer, v_quantizer = self.quantizers(layer)
        q_NTD = heads_to_rows(q_BTHD).astype(jnp.float32)
        pos_NT1 = _rows_of(q_positions_BT, H)[:, :, None]
        start_N11 = _rows_of(self.lengths, H)[:, None, None]  # positions below are stored
        # Exact keys: the chunk (causal) and the window's slots holding stored positions.
        keys_NSD = heads_to_rows(k_BTHD)
        values_NSD = heads_to_rows(v_BTHD)
        exact_pos_NS = start_N11[:, 0] + jnp.arange(T)[None, :]
        window_pos_NW = None
        if self.window_pos is not None:
            window_pos_NW = _rows_of(self.window_pos, H)
            keys_NSD = jnp.concatenate([keys_NSD, self.k_window[layer].astype(keys_NSD.dtype)], 1)
            values_NSD = jnp.concatenate(
                [values_NSD, self.v_window[layer].astype(values_NSD.dtype)], 1)
            # a slot counts if it holds a stored position (< lengths): the chunk is above
            exact_pos_NS = jnp.concatenate(
                [exact_pos_NS, jnp.where(window_pos_NW < start_N11[:, 0], window_pos_NW,
                                         _EMPTY)], 1)
        exact_NTS = jnp.einsum("NTD,NSD->NTS", q_NTD, keys_NSD.astype(jnp.float32),
                               preferred_element_type=jnp.float32) * D**-0.5
        m_NT, l_NT, acc = self._coded_prefix(layer, k_quantizer, v_quantizer, q_NTD, pos_NT1,
                                             start_N11, window_pos_NW)
        probs_NTS, rescale_NT, _, l_NT = _combine(
            m_NT, l_NT, exact_NTS, exact_pos_NS[:, None, :] <= pos_NT1)
        out_NTD = (v_quantizer.finish_sum(acc) * rescale_NT[..., None]
                   + jnp.einsum("NTS,NSD->NTD", probs_NTS, values_NSD.astype(jnp.float32),
                                preferred_element_type=jnp.float32)) / l_NT[..., None]
        return rows_to_heads(out_NTD, B).astype(q_BTHD.dtype)

    def _coded_prefix(self, layer, k_quantizer, v_quantizer, q_NTD, pos_NT1, start_N11,
                      window_pos_NW):
        """Softmax pieces over the codes of the stored positions (< lengths): (max [N, T],
        normaliser [N, T], v_quantizer.rotated_sum of the unnormalised probabilities).

        Only the filled prefix is read: a `lax.switch` picks the smallest of the static
        lengths `prefix_buckets(max_len)` that holds every row's stored positions, and that
        branch reads the codes up to it (a `lax.cond` reads nothing while no row has any: a
        prefill). The lengths are static shapes, so a decode loop compiles once, and it reads
        less than twice the filled prefix (~1.4x averaged over a long decode) instead of all
        max_len slots."""
        N, T, D = q_NTD.shape
        nothing = (jnp.full((N, T), jnp.finfo(jnp.float32).min), jnp.zeros((N, T)))  # m, l

        # an iota made inside the branches let XLA constant-fold a prefill's masked scores
        # (its lengths are a compile-time zero): 57 s instead of 7 s to compile the 124M
        # model's 512-token prefill
        positions = jnp.arange(self.max_len)

        def coded(S: int):
            pos_S = positions[:S]
            mask_NTS = (pos_S < start_N11) & (pos_S <= pos_NT1)
            if window_pos_NW is not None:  # slot p % W still holds p: read exactly there
                held_NS = window_pos_NW[:, pos_S % self.window] == pos_S
                mask_NTS &= ~held_NS[:, None, :]
            prefix = lambda codes: jax.tree.map(lambda x: x[:, :S], codes)
            scores_NTS = k_quantizer.scores(k_quantizer.prepare_query(q_NTD),
                                            prefix(self.k[layer]))
            probs_NTS, _, m_NT, l_NT = _combine(*nothing, scores_NTS * D**-0.5, mask_NTS)
            return m_NT, l_NT, v_quantizer.rotated_sum(probs_NTS, prefix(self.v[layer]))

        buckets = prefix_buckets(self.max_len)
        filled = jnp.max(self.lengths)
        acc = jax.eval_shape(lambda: coded(buckets[0]))[2]
        empty = lambda: (*nothing, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), acc))
        read = lambda: jax.lax.switch(jnp.searchsorted(jnp.asarray(buckets), filled),
                                      [functools.partial(coded, S) for S in buckets])
        return jax.lax.cond(filled > 0, read, empty)

    def advance(self, num_tokens: int) -> TurboQuantCache:
        return self.replace(lengths=self.lengths + num_tokens)


def _check_turboquant(tq_config, head_dim: int) -> None:
    if not isinstance(tq_config, TurboQuantConfig):
        raise ValueError(
            f"tq_config={tq_config!r} is invalid: pass a TurboQuantConfig, e.g. "
            f"TurboQuantConfig(bits=3)")
    tq_config.check(head_dim)  # e.g. an outlier split that leaves too few regular channels


def init_turboquant_cache(config: GPTConfig, batch: int, max_len: int,
                          tq_config: TurboQuantConfig, dtype=jnp.float32) -> TurboQuantCache:
    """Zeroed codes for `batch` rows of up to `max_len` tokens each; the window (if any)
    holds min(tq_config.window, max_len) tokens in `dtype`."""
    _check_size(config, batch, max_len)
    _check_turboquant(tq_config, config.head_dim)
    N, D = batch * config.n_head, config.head_dim
    layers = [turboquant_quantizers(tq_config, D, i) for i in range(config.n_layer)]
    rows = jax.ShapeDtypeStruct((N, max_len, D), jnp.float32)
    zeros = lambda quantizer: jax.tree.map(  # zeroed codes, shaped without computing any
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(quantizer.quantize, rows))
    W = min(tq_config.window, max_len)
    window = lambda: tuple(jnp.zeros((N, W, D), dtype) for _ in layers) if W else ()
    selects = tq_config.outlier_select != "first"
    perms = lambda spec: tuple(  # chosen at each row's first write; channel order until then
        jnp.broadcast_to(jnp.arange(D, dtype=jnp.int32), (N, 1, D)) for _ in layers
    ) if selects and isinstance(spec, OutlierSplit) else ()
    return TurboQuantCache(
        k=tuple(zeros(k) for k, _ in layers), v=tuple(zeros(v) for _, v in layers),
        lengths=jnp.zeros((batch,), jnp.int32),
        k_window=window(), v_window=window(),
        window_pos=jnp.full((batch, W), _EMPTY, jnp.int32) if W else None,
        k_perm=perms(tq_config.key_spec), v_perm=perms(tq_config.value_spec),
        tq=tq_config, head_dim=D,
    )


def check_cache_kind(kind, config: GPTConfig) -> None:
    """Raise a ValueError naming the fix unless `make_cache` accepts kind for config."""
    if isinstance(kind, TurboQuantConfig):
        _check_turboquant(kind, config.head_dim)
    elif kind is not None and kind not in CACHE_DTYPES:
        raise ValueError(
            f"kv_cache={kind!r} is invalid: use None (float in the model's dtype), one of "
            f"{CACHE_DTYPES}, or TurboQuantConfig(bits=...)")


def make_cache(config: GPTConfig, batch: int, max_len: int, kind=None):
    """kind None: `KVCache` in config.dtype; a name of CACHE_DTYPES: `KVCache` in it; a
    TurboQuantConfig: `TurboQuantCache` (window in config.dtype)."""
    check_cache_kind(kind, config)
    if isinstance(kind, TurboQuantConfig):
        return init_turboquant_cache(config, batch, max_len, kind, jnp.dtype(config.dtype))
    return init_cache(config, batch, max_len, jnp.dtype(kind or config.dtype))
