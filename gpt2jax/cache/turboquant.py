"""The TurboQuant KV cache: keys and values stored as TurboQuant codes (arXiv:2504.19874,
Algorithms 1-2; the math is `gpt2jax.quant.turboquant`), plus an optional float window of the
most recent tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from gpt2jax.attention import heads_to_rows, rows_to_heads
from gpt2jax.cache.dense import check_size, replace_at, row_positions, scatter_rows
from gpt2jax.config import GPTConfig
from gpt2jax.quant.turboquant import OutlierSplit, TurboQuantConfig, outlier_permutation

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
                cache = cache.replace(**{name: replace_at(perms, layer, perm)})
        k_quantizer, v_quantizer = cache.quantizers(layer)
        pos_NT = row_positions(self.lengths, H, T)
        new_k = scatter_rows(self.k[layer], k_quantizer.quantize(k_NTD), pos_NT)
        new_v = scatter_rows(self.v[layer], v_quantizer.quantize(v_NTD), pos_NT)
        cache = cache.replace(k=replace_at(self.k, layer, new_k),
                              v=replace_at(self.v, layer, new_v))
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
        put = lambda bufs, new_BTHD: replace_at(
            bufs, layer, scatter_rows(bufs[layer], heads_to_rows(new_BTHD), slot_NT))
        return self.replace(
            k_window=put(self.k_window, k_BTHD),
            v_window=put(self.v_window, v_BTHD),
            # every layer writes the same positions: rewriting them is a no-op
            window_pos=scatter_rows(self.window_pos, pos_BT, slot_BT),
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


def check_turboquant(tq_config, head_dim: int) -> None:
    if not isinstance(tq_config, TurboQuantConfig):
        raise ValueError(
            f"tq_config={tq_config!r} is invalid: pass a TurboQuantConfig, e.g. "
            f"TurboQuantConfig(bits=3)")
    tq_config.check(head_dim)  # e.g. an outlier split that leaves too few regular channels


def init_turboquant_cache(config: GPTConfig, batch: int, max_len: int,
                          tq_config: TurboQuantConfig, dtype=jnp.float32) -> TurboQuantCache:
    """Zeroed codes for `batch` rows of up to `max_len` tokens each; the window (if any)
    holds min(tq_config.window, max_len) tokens in `dtype`."""
    check_size(config, batch, max_len)
    check_turboquant(tq_config, config.head_dim)
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
