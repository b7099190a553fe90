"""The float KV cache, and the row writes every cache kind shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gpt2jax import backend
from gpt2jax.attention import (
    causal_mask,
    dot_product_attention,
    heads_to_rows,
    masked_attention,
    uses_dot_product_attention,
)
from gpt2jax.config import GPTConfig


def row_positions(lengths_B, heads: int, T: int):
    """[B*H, T] positions of T new tokens of each row: lengths[b] + t."""
    return jnp.repeat(lengths_B, heads)[:, None] + jnp.arange(T)[None, :]


def scatter_rows(buf_tree, new_tree, index_NT):
    """buf[n, index[n, t]] = new[n, t] for every leaf pair ([N, S, ...] and [N, T, ...]);
    in place inside jit/scan. Indices >= S are dropped: callers size the cache (generate does,
    up front), and the window write drops on purpose."""
    rows_N1 = jnp.arange(index_NT.shape[0])[:, None]
    return jax.tree.map(
        lambda buf, new: buf.at[rows_N1, index_NT].set(new.astype(buf.dtype), mode="drop"),
        buf_tree, new_tree,
    )


def write_heads(buf_BHSD, new_BTHD, lengths_B):
    """buf[b, h, lengths[b] + t] = new[b, t, h]; on CPU through the rows [B*H, S, D], which
    XLA:CPU scatters into in place (a free reshape of the buffer: `gpt2jax.backend`)."""
    B, H, S, D = buf_BHSD.shape
    T = new_BTHD.shape[1]
    if backend.cpu_layouts():
        rows_NSD = scatter_rows(buf_BHSD.reshape(B * H, S, D), heads_to_rows(new_BTHD),
                                row_positions(lengths_B, H, T))
        return rows_NSD.reshape(B, H, S, D)
    pos_BT = lengths_B[:, None] + jnp.arange(T)[None, :]
    return buf_BHSD.at[jnp.arange(B)[:, None], :, pos_BT].set(
        new_BTHD.astype(buf_BHSD.dtype), mode="drop")


def replace_at(items: tuple, i: int, item) -> tuple:
    return items[:i] + (item,) + items[i + 1:]


@struct.dataclass
class KVCache:
    """Full-precision cache. k, v: per layer [batch, head, max_len, head_dim]; lengths
    [batch]: tokens cached per batch row.

    One buffer per layer, not one [layer, ...] stack: XLA on CPU copies a layer out of a
    stack before the matmul that reads it, while a separate buffer is updated and read in
    place (124M decode step with 1024 cached tokens, together with the row-major products of
    `masked_attention`: 29.1 -> 24.2 ms, best of 3 on a shared 2-core CPU)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array
    dot_product: bool = struct.field(pytree_node=False, default=False)  # see attend

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def write(self, layer: int, k_BTHD, v_BTHD) -> KVCache:
        return self.replace(
            k=replace_at(self.k, layer, write_heads(self.k[layer], k_BTHD, self.lengths)),
            v=replace_at(self.v, layer, write_heads(self.v[layer], v_BTHD, self.lengths)),
        )

    def attend(self, layer: int, q_BTHD, q_positions_BT, k_BTHD=None, v_BTHD=None):
        """The chunk's own k/v (the interface's last two arguments) are read back from the
        buffers, where `write` put them exactly."""
        mask_BTS = causal_mask(q_positions_BT, self.max_len)
        if self.dot_product:  # it takes [B, S, H, D] only: the buffers are copied to that
            return dot_product_attention(q_BTHD, self.k[layer].transpose(0, 2, 1, 3),
                                         self.v[layer].transpose(0, 2, 1, 3), mask_BTS)
        return masked_attention(q_BTHD, self.k[layer], self.v[layer], mask_BTS)

    def advance(self, num_tokens: int) -> KVCache:
        return self.replace(lengths=self.lengths + num_tokens)


def check_size(config: GPTConfig, batch: int, max_len: int) -> None:
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got {batch=}, {max_len=}")
    if config.pos_embedding == "learned" and max_len > config.block_size:
        raise ValueError(
            f"max_len={max_len} exceeds block_size={config.block_size}: learned positions (wpe) "
            f"have no embedding beyond it; use max_len <= {config.block_size}"
        )


def init_cache(config: GPTConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zeroed buffers for `batch` rows of up to `max_len` tokens each."""
    check_size(config, batch, max_len)
    shape = (batch, config.n_head, max_len, config.head_dim)
    # distinct buffers, not one shared: a caller may donate the cache to a jitted step
    layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return KVCache(k=layers(), v=layers(), lengths=jnp.zeros((batch,), jnp.int32),
                   dot_product=uses_dot_product_attention(config))
