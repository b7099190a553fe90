"""INT8 weight quantization as a parameter-tree transform (LLM.int8()'s absmax, weight-only).

`quantize(params)` returns a tree of the same structure in which every eligible matmul kernel
is a `QTensor` (int8 values + float32 scales); the same `forward` / `generate` run on it,
because `Linear` multiplies through `matmul` and `Norm` reads through `as_float`.

By default only the linear layers' kernels are quantized (`c_attn`, `attn.c_proj`, `c_fc`,
`mlp.c_proj`): norm scales and biases, every bias, and the embeddings (`wte` is also the tied
output head) stay float. `skip_embeddings_and_biases` quantizes the norm leaves too, the
ablation that measures why they are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

GRANULARITIES = ("channel", "tensor")
_KERNEL_MODULES = ("c_attn", "c_proj", "c_fc")
_NORM_MODULES = ("ln_1", "ln_2", "ln_f")


@struct.dataclass
class QTensor:
    """int8 `values` with float32 `scale` broadcastable to them: value ≈ values * scale.

    `values` comes first so Flax's shape check of a param sees the float tensor's shape."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.values.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.values.astype(dtype) * self.scale.astype(dtype)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def is_kernel_leaf(path) -> bool:
    keys = _keys(path)
    return len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in _KERNEL_MODULES


def is_norm_leaf(path) -> bool:
    keys = _keys(path)
    return len(keys) >= 2 and keys[-2] in _NORM_MODULES


def default_skip(path, leaf) -> bool:
    """Keep everything float except the linear layers' kernels."""
    return not is_kernel_leaf(path)


def skip_embeddings_and_biases(path, leaf) -> bool:
    """Ablation: quantize the norm leaves (scale and bias) too."""
    return not (is_kernel_leaf(path) or is_norm_leaf(path))


def quantize_array(w: jax.Array, *, granularity: str = "channel", kernel: bool = True) -> QTensor:
    """Symmetric absmax int8 in [-127, 127].

    Kernels [..., in, out]: one scale per output column ("channel") or per matrix ("tensor");
    a leading layer axis keeps its own scales. Vectors [..., D]: one scale per vector."""
    w = jnp.asarray(w, jnp.float32)
    axes = (-2,) if kernel and granularity == "channel" else (-2, -1) if kernel else (-1,)
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)  # an all-zero column stays exactly 0
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QTensor(values=values, scale=scale)


def granularity_of(q: QTensor) -> str:
    """How a kernel was quantized, read from its scale: one per column, or one in all."""
    return "channel" if q.scale.shape[-1] > 1 else "tensor"


def _check_quantizable(params) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, QTensor)
    ):
        if isinstance(leaf, QTensor):
            raise ValueError(
                f"{'/'.join(_keys(path))} is already quantized: quantize the float params "
                f"(or call dequantize first)"
            )
        if any(k.startswith("lora") for k in _keys(path)):
            raise ValueError(
                f"{'/'.join(_keys(path))} is a LoRA adapter: merge the adapters into the base "
                f"(gpt2jax.lora.merge) before quantizing"
            )


def quantize(params, *, skip: Callable = default_skip, granularity: str = "channel"):
    """The param tree with every leaf that `skip(path, leaf)` rejects replaced by a QTensor."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is invalid: choose one of {GRANULARITIES}")
    _check_quantizable(params)

    def convert(path, leaf):
        if skip(path, leaf):
            return leaf
        return quantize_array(leaf, granularity=granularity, kernel=is_kernel_leaf(path))

    return jax.tree_util.tree_map_with_path(convert, params)


_SKIPS = {"default": default_skip, "norms_too": skip_embeddings_and_biases}


def options(recorded: dict) -> dict:
    """quantize() keyword arguments from what a quantized checkpoint records
    ({"granularity": ..., "skip": "default" | "norms_too"})."""
    return {"granularity": recorded["granularity"], "skip": _SKIPS[recorded["skip"]]}


def dequantize(params):
    """Float tree back from a quantized one (float leaves pass through untouched)."""
    return jax.tree_util.tree_map(
        as_float, params, is_leaf=lambda x: isinstance(x, QTensor)
    )


def is_quantized(params) -> bool:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QTensor))
    return any(isinstance(x, QTensor) for x in leaves)


def nbytes(tree) -> int:
    """Bytes held by every array of a tree (int8 values and their scales included).

    Works on shapes alone too (`jax.eval_shape` output), so big models need no memory."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------- model hooks


def as_float(param, dtype=jnp.float32):
    """A param as a float array whether or not it was quantized."""
    if isinstance(param, QTensor):
        return param.dequantize(dtype)
    return param


def matmul(x, kernel, dtype):
    """x @ kernel in `dtype`; a quantized kernel multiplies its scale after the matmul
    (equal to dequantize-then-matmul, but the int8 tensor is what is read)."""
    if isinstance(kernel, QTensor):
        y = jnp.dot(x.astype(dtype), kernel.values.astype(dtype))
        return y * kernel.scale.reshape(kernel.scale.shape[-1:]).astype(dtype)
    return jnp.dot(x.astype(dtype), kernel.astype(dtype))
