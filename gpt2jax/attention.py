"""Attention: masked (einsum + masked softmax) and `jax.nn.dot_product_attention` (cuDNN's
fused kernel where it applies), and the causal mask.

Keys and values are [B, H, S, D] (heads on their own axis, as the cache holds them); on CPU
the masked path reads them as rows [B*H, S, D], a free reshape, because XLA:CPU's products
read that layout as stored (`gpt2jax.backend`, docs/design.md#cache-rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2jax import backend
from gpt2jax.config import GPTConfig


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


def masked_attention(q_BTHD, k_BHSD, v_BHSD, mask_BTS, probs_dropout=None):
    """Scaled dot-product attention of q [B, T, H, D] over keys/values [B, H, S, D].

    Scores and softmax in float32 whatever the inputs. On CPU the products take the key and
    value rows [B*H, S, D] exactly as stored: a key operand needing a transpose (4x slower
    decode attention, measured) costs more than the attention itself."""
    B, T, H, D = q_BTHD.shape
    S = k_BHSD.shape[2]
    if backend.cpu_layouts():
        scores_NTS = jnp.einsum("NTD,NSD->NTS", heads_to_rows(q_BTHD), k_BHSD.reshape(B * H, S, D),
                                preferred_element_type=jnp.float32)
        scores_BHTS = scores_NTS.reshape(B, H, T, S)
    else:
        scores_BHTS = jnp.einsum("BTHD,BHSD->BHTS", q_BTHD, k_BHSD,
                                 preferred_element_type=jnp.float32)
    probs_BHTS = masked_softmax(scores_BHTS * D**-0.5, mask_BTS, probs_dropout).astype(
        v_BHSD.dtype)
    if backend.cpu_layouts():
        out_NTD = jnp.einsum("NTS,NSD->NTD", probs_BHTS.reshape(B * H, T, S),
                             v_BHSD.reshape(B * H, S, D), preferred_element_type=jnp.float32)
        return rows_to_heads(out_NTD, B).astype(q_BTHD.dtype)
    out_BTHD = jnp.einsum("BHTS,BHSD->BTHD", probs_BHTS, v_BHSD,
                          preferred_element_type=jnp.float32)
    return out_BTHD.astype(q_BTHD.dtype)


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
