"""RoPE and sinusoidal encodings against their definitions (RoFormer, arXiv:2104.09864, §3.4;
Vaswani et al., arXiv:1706.03762, §3.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.positions import apply_rope, rope_frequencies, sinusoidal


def _rope_at(x_D, m):
    return apply_rope(x_D[None, None, None], jnp.array([[m]]))[0, 0, 0]


def test_frequencies():
    theta = np.asarray(rope_frequencies(64))
    assert theta[0] == 1.0
    np.testing.assert_allclose(theta[1], 0.7498942, rtol=1e-6)
    np.testing.assert_allclose(theta[31], 1.3335e-4, rtol=1e-4)


def test_identity_at_zero_and_norm_preserved():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 64))
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros((2, 5), jnp.int32)), x)
    pos = jax.random.randint(jax.random.key(1), (2, 5), 0, 5000)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(x, pos), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-6
    )


@pytest.mark.parametrize("offset", [0, 1, 7, 300])
def test_scores_depend_only_on_offset(offset):
    q, k = jax.random.normal(jax.random.key(2), (2, 64))
    scores = [float(_rope_at(q, m) @ _rope_at(k, m + offset)) for m in (0, 5, 123, 999)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)


def test_first_pair_rotates_by_one_radian_per_position():
    e0 = jnp.zeros(64).at[0].set(1.0)
    np.testing.assert_allclose(_rope_at(e0, 0) @ _rope_at(e0, 1), np.cos(1.0), rtol=1e-6)


def test_half_split_is_interleaved_conjugated_by_evens_then_odds():
    """Our half-split RoPE equals the RoFormer interleaved operator up to a fixed permutation."""
    d = 16
    x = jax.random.normal(jax.random.key(3), (1, 4, 2, d))
    pos = jnp.array([[0, 3, 17, 250]])
    theta = np.repeat(np.asarray(rope_frequencies(d)), 2)  # (θ0, θ0, θ1, θ1, ...)
    angles = np.asarray(pos)[..., None, None] * theta
    xn = np.asarray(x)
    rot = np.stack([-xn[..., 1::2], xn[..., 0::2]], axis=-1).reshape(xn.shape)
    interleaved = xn * np.cos(angles) + rot * np.sin(angles)
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # evens, then odds
    np.testing.assert_allclose(apply_rope(x[..., perm], pos), interleaved[..., perm], atol=1e-5)


def test_sinusoidal_matches_vaswani():
    pe = np.asarray(sinusoidal(jnp.arange(50)[None], 32))[0]
    p, i = 37, 5
    np.testing.assert_allclose(pe[p, 2 * i], np.sin(p / 10000 ** (2 * i / 32)), rtol=1e-5)
    np.testing.assert_allclose(pe[p, 2 * i + 1], np.cos(p / 10000 ** (2 * i / 32)), rtol=1e-5)
