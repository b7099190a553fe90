"""The output head and its cross-entropy, fused: mean loss and gradient in one pass.

Unfused (`model.apply` -> logits -> `optax.softmax_cross_entropy_with_integer_labels`),
autodiff keeps the float32 [tokens, vocab] logits for the backward pass, reads them again
for the softmax, scatters into a zero tensor for the gradient of the label gather, and
transposes the [tokens, vocab] gradient before the weight-gradient matmul (the baby step
spent 0.28 s of 3.3 s there; docs/design.md#head-loss). Here the forward pass of the custom
VJP computes, chunk by chunk of tokens, the logits, the log-sum-exp and `softmax - onehot`
(a compare against the labels, no scatter), and multiplies that straight into the
gradients of the hidden states and of the head; the backward pass only scales them by the
incoming cotangent. The loss is a mean, so the cotangent is one scalar and nothing of size
[tokens, vocab] outlives its chunk.

The vocabulary is not padded to a multiple of 64: alone, XLA:CPU's GEMM is faster on
50,304 columns than on 50,257, but masking the padded logits out of the softmax costs a
full pass over the [tokens, vocab] block (0.11 s of a 3.7 s baby step, 0.18 s of 7.0 s at
124M), more than the GEMMs gain (docs/design.md#head-loss).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 4096  # tokens per chunk: bounds the [chunk, vocab] block at 0.8 GB


def _loss_and_dlogits(h_CD, head_VD, labels_C, want_dlogits: bool):
    """Per-token loss [C] and, if wanted, (softmax - onehot) [C, V]."""
    logits_CV = jnp.einsum("CD,VD->CV", h_CD, head_VD, preferred_element_type=jnp.float32)
    max_C1 = logits_CV.max(-1, keepdims=True)
    exp_CV = jnp.exp(logits_CV - max_C1)
    sum_C1 = exp_CV.sum(-1, keepdims=True)
    label_logit_C = jnp.take_along_axis(logits_CV, labels_C[:, None], axis=1)[:, 0]
    loss_C = (max_C1 + jnp.log(sum_C1))[:, 0] - label_logit_C
    if not want_dlogits:
        return loss_C, None
    column_V = jnp.arange(head_VD.shape[0])
    return loss_C, exp_CV / sum_C1 - (column_V == labels_C[:, None])


def _chunks(h_ND, labels_N, chunk: int):
    """h [K, C, D], labels [K, C] and a 0/1 row weight [K, C]: N rows in K chunks of C, the
    last one padded (weight 0)."""
    N = h_ND.shape[0]
    C = min(chunk, N)
    pad = -N % C
    h_KCD = jnp.pad(h_ND, ((0, pad), (0, 0))).reshape(-1, C, h_ND.shape[1])
    labels_KC = jnp.pad(labels_N, (0, pad)).reshape(-1, C)
    weight_KC = (jnp.arange(N + pad) < N).astype(jnp.float32).reshape(-1, C)
    return h_KCD, labels_KC, weight_KC


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mean_loss(h_ND, head_VD, labels_N, chunk: int):
    def chunk_loss(total, inputs):
        h_CD, labels_C, weight_C = inputs
        loss_C, _ = _loss_and_dlogits(h_CD, head_VD, labels_C, False)
        return total + (loss_C * weight_C).sum(), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32),
                            _chunks(h_ND, labels_N, chunk))
    return total / h_ND.shape[0]


def _mean_loss_fwd(h_ND, head_VD, labels_N, chunk: int):
    N, D = h_ND.shape

    # A scan, not a Python loop: it orders the chunks, so one [C, vocab] block is live.
    def chunk_step(carry, inputs):
        total, dhead_VD = carry
        h_CD, labels_C, weight_C = inputs
        loss_C, dlogits_CV = _loss_and_dlogits(h_CD, head_VD, labels_C, True)
        dlogits_CV = (dlogits_CV * weight_C[:, None]).astype(h_ND.dtype)
        dh_CD = jnp.einsum("CV,VD->CD", dlogits_CV, head_VD, preferred_element_type=jnp.float32)
        dhead_VD += jnp.einsum("CV,CD->VD", dlogits_CV, h_CD, preferred_element_type=jnp.float32)
        return (total + (loss_C * weight_C).sum(), dhead_VD), dh_CD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_VD.shape, jnp.float32))
    (total, dhead_VD), dh_KCD = jax.lax.scan(chunk_step, init, _chunks(h_ND, labels_N, chunk))
    # In the primal dtypes: the cotangents a custom VJP returns must match its inputs.
    grads = ((dh_KCD.reshape(-1, D)[:N] / N).astype(h_ND.dtype),
             (dhead_VD / N).astype(head_VD.dtype))
    return total / N, grads


def _mean_loss_bwd(chunk, grads, g):
    dh_ND, dhead_VD = grads
    return (g * dh_ND).astype(dh_ND.dtype), (g * dhead_VD).astype(dhead_VD.dtype), None


_mean_loss.defvjp(_mean_loss_fwd, _mean_loss_bwd)


def head_cross_entropy(h_ND, head_VD, labels_N, *, chunk: int = DEFAULT_CHUNK):
    """Mean over N tokens of -log softmax(h @ head.T)[label], float32, with a fused gradient.

    h_ND: final hidden states (after ln_f), the compute dtype. head_VD: the output head as
    [vocab, D] (the tied `wte`, or an untied `lm_head` transposed). labels_N: int ids."""
    if h_ND.ndim != 2 or head_VD.ndim != 2 or h_ND.shape[1] != head_VD.shape[1]:
        raise ValueError(f"head_cross_entropy needs h [N, D] and head [V, D], got "
                         f"{h_ND.shape} and {head_VD.shape}")
    if labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"labels {labels_N.shape} must be [N] for h {h_ND.shape}")
    return _mean_loss(h_ND, head_VD.astype(h_ND.dtype), labels_N.astype(jnp.int32), chunk)
