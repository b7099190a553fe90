"""The fused head cross-entropy against optax, in value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2jax import loss as loss_lib
from gpt2jax import model
from gpt2jax.config import GPTConfig
from train import step as step_lib


def _reference(h_ND, head_VD, labels_N):
    logits = jnp.einsum("ND,VD->NV", h_ND, head_VD, precision="highest")
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels_N).mean()


def _rel(a, b):
    """Norm-wise relative error (elementwise, float32 sums over 1,000 logits differ ~1e-6)."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("n_tokens,chunk", [(48, 4096), (50, 16)])
def test_value_and_gradient_equal_optax(n_tokens, chunk):
    # 50 tokens in chunks of 16: the last chunk is padded and its pad rows weighted 0.
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (n_tokens, 32))
    head = jax.random.normal(k2, (1000, 32)) * 0.5
    labels = jax.random.randint(k3, (n_tokens,), 0, 1000)
    fused = jax.value_and_grad(
        lambda h, w: loss_lib.head_cross_entropy(h, w, labels, chunk=chunk), argnums=(0, 1))
    reference = jax.value_and_grad(lambda h, w: _reference(h, w, labels), argnums=(0, 1))
    (value, (dh, dhead)), (ref_value, (ref_dh, ref_dhead)) = fused(h, head), reference(h, head)
    assert abs(float(value - ref_value)) <= 1e-6 * abs(float(ref_value))
    assert _rel(dh, ref_dh) < 1e-6 and _rel(dhead, ref_dhead) < 1e-6
    # scaling the cotangent scales the gradient (the backward pass applies it)
    dh3 = jax.grad(lambda h: 3.0 * loss_lib.head_cross_entropy(h, head, labels, chunk=chunk))(h)
    np.testing.assert_allclose(dh3, 3.0 * dh, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n_tokens,chunk", [(48, 4096), (50, 16)])
def test_the_no_gradient_path_gives_the_same_loss(n_tokens, chunk):
    """Called without a gradient (evaluation), the loss runs its own primal scan, which
    computes no [chunk, vocab] gradient block: it must weight the pad rows out too."""
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    h = jax.random.normal(k1, (n_tokens, 32))
    head = jax.random.normal(k2, (1000, 32)) * 0.5
    labels = jax.random.randint(k3, (n_tokens,), 0, 1000)
    plain = jax.jit(lambda h: loss_lib.head_cross_entropy(h, head, labels, chunk=chunk))(h)
    with_grad, _ = jax.value_and_grad(
        lambda h: loss_lib.head_cross_entropy(h, head, labels, chunk=chunk))(h)
    reference = _reference(h, head, labels)
    assert abs(float(plain - reference)) <= 1e-6 * abs(float(reference))
    assert abs(float(plain - with_grad)) <= 1e-6 * abs(float(reference))


@pytest.mark.parametrize("tie", [True, False])
def test_train_loss_equals_logits_path(tie):
    """The train step's loss (hidden states + fused head) equals the logits path's, and so do
    the gradients of every parameter, tied or untied head."""
    config = GPTConfig(vocab_size=200, block_size=16, n_layer=2, n_head=2, n_embd=32,
                       tie_embeddings=tie)
    params = model.init_params(config, jax.random.key(1))
    x, y = (jax.random.randint(jax.random.key(i), (2, 16), 0, 200) for i in (2, 3))

    def fused(p):
        (h, head), _ = model.apply(p, x, config, hidden_only=True)
        return loss_lib.head_cross_entropy(h.reshape(-1, 32), head, y.reshape(-1))

    def reference(p):
        return step_lib.token_losses(p, x, y, config).mean()

    (value, grads), (ref_value, ref_grads) = (jax.value_and_grad(f)(params)
                                              for f in (fused, reference))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_bad_shapes_are_named():
    h, head = jnp.zeros((4, 8)), jnp.zeros((10, 6))
    with pytest.raises(ValueError, match=r"h \[N, D\] and head \[V, D\].*\(4, 8\).*\(10, 6\)"):
        loss_lib.head_cross_entropy(h, head, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"labels \(3,\) must be \[N\]"):
        loss_lib.head_cross_entropy(h, jnp.zeros((10, 8)), jnp.zeros(3, jnp.int32))
