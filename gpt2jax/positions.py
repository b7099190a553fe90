"""Position encodings as small pure functions (no parameters here; `wpe` lives in the model).

RoPE pairing convention: **half-split** (GPT-NeoX / Hugging Face LLaMA `rotate_half`):
dimension i is paired with i + d/2. It is the interleaved RoFormer operator conjugated by
the evens-then-odds permutation (tested), and it needs no strided gather.
"""

from __future__ import annotations

import jax.numpy as jnp


def sinusoidal(positions_BT: jnp.ndarray, dim: int, base: float = 10000.0) -> jnp.ndarray:
    """Vaswani et al. encodings [B, T, dim]: even dims sin(p / base^(2i/dim)), odd dims cos."""
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [ceil(dim/2)]
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    pe = jnp.stack([jnp.sin(angles_BTF), jnp.cos(angles_BTF)], axis=-1)  # [B, T, F, 2]
    return pe.reshape(*positions_BT.shape, -1)[..., :dim]


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jnp.ndarray:
    """theta_i = base^(-2i/d), i = 0 .. d/2-1."""
    return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x_BTHD: jnp.ndarray, positions_BT: jnp.ndarray, base: float = 10000.0):
    """Rotate pairs (x_i, x_{i+d/2}) by angle position * theta_i. Computed in float32."""
    head_dim = x_BTHD.shape[-1]
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * rope_frequencies(head_dim, base)
    cos = jnp.cos(angles_BTF)[:, :, None, :]  # [B, T, 1, d/2]: broadcast over heads
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.astype(x_BTHD.dtype)
