"""The KV cache as a value: a pytree that goes into the forward and comes out updated.

Interface every cache kind implements (so attention never branches on the kind):

- `write(layer, k_BTHD, v_BTHD) -> cache`: store T new keys/values of every row at that
  row's own offset `lengths[b]` (keys arrive already rotated when RoPE is on);
- `attend(layer, q_BTHD, q_positions_BT) -> out_BTHD`: causal attention of the queries over
  everything cached for that layer (buffer index == absolute position);
- `advance(T) -> cache`: the rows' lengths grow by T once every layer has written;
- `nbytes`: the bytes its arrays hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gpt2jax.config import GPTConfig


def masked_attention(q_BTHD, k_BHSD, v_BHSD, mask_BTS, probs_dropout=None):
    """Scaled dot-product attention; scores and softmax in float32 whatever the inputs."""
    scale = q_BTHD.shape[-1] ** -0.5
    scores_BHTS = jnp.einsum(
        "BTHD,BHSD->BHTS", q_BTHD, k_BHSD, preferred_element_type=jnp.float32
    ) * scale
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    if probs_dropout is not None:
        probs_BHTS = probs_dropout(probs_BHTS)
    return jnp.einsum(
        "BHTS,BHSD->BTHD", probs_BHTS.astype(v_BHSD.dtype), v_BHSD,
        preferred_element_type=jnp.float32,
    ).astype(q_BTHD.dtype)


def causal_mask(q_positions_BT, num_keys: int):
    """mask[b, t, s] = key position s <= query position (the buffer index is the position)."""
    return jnp.arange(num_keys)[None, None, :] <= q_positions_BT[:, :, None]


def _write_rows(buf_LBHSD, layer, new_BTHD, lengths_B):
    """Scatter new_BTHD into buf[layer, b, :, lengths[b] + t]; in place inside jit/scan."""
    B, T = new_BTHD.shape[:2]
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    pos_BT = lengths_B[:, None] + jnp.arange(T)[None, :]
    # Advanced indices separated by a slice move to the front: the target is [B, T, H, D].
    return buf_LBHSD.at[layer, rows_BT, :, pos_BT].set(new_BTHD.astype(buf_LBHSD.dtype))


@struct.dataclass
class KVCache:
    """Full-precision cache: k, v [layer, batch, head, max_len, head_dim]; lengths [batch]."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def write(self, layer, k_BTHD, v_BTHD) -> KVCache:
        return self.replace(
            k=_write_rows(self.k, layer, k_BTHD, self.lengths),
            v=_write_rows(self.v, layer, v_BTHD, self.lengths),
        )

    def attend(self, layer, q_BTHD, q_positions_BT):
        mask_BTS = causal_mask(q_positions_BT, self.max_len)
        return masked_attention(q_BTHD, self.k[layer], self.v[layer], mask_BTS)

    def advance(self, num_tokens: int) -> KVCache:
        return self.replace(lengths=self.lengths + num_tokens)


def init_cache(config: GPTConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zeroed buffers for `batch` rows of up to `max_len` tokens each."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got {batch=}, {max_len=}")
    if config.pos_embedding == "learned" and max_len > config.block_size:
        raise ValueError(
            f"max_len={max_len} exceeds block_size={config.block_size}: learned positions (wpe) "
            f"have no embedding beyond it; use max_len <= {config.block_size}"
        )
    shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
