"""The layers every block is made of (Embed, Linear, Norm), and the one dispatch on weight kinds.

A weight is a float array or a quantized kind (`gpt2jax.quant.int8.QTensor`); `weight(w)` is
the only place that tells them apart. Each kind answers the same four members, so the layers
never branch on it and a new kind (int4, fp8) is a new class in its own file:

    shape                                   the logical shape ([in, out] for a kernel)
    dot(x, dtype, transpose, out_dtype)     x @ w (x @ wᵀ with transpose), computed in dtype
    take(ids, dtype)                        rows of an embedding table
    dequantize(dtype)                       the weight as a float array
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import GPTConfig


@dataclasses.dataclass(frozen=True)
class FloatWeight:
    """A float array seen through the weight-kind members."""

    array: jax.Array

    @property
    def shape(self):
        return tuple(self.array.shape)

    def dot(self, x, dtype, *, transpose: bool = False, out_dtype=None):
        contract = (((x.ndim - 1,), (1 if transpose else 0,)), ((), ()))
        return jax.lax.dot_general(x.astype(dtype), self.array.astype(dtype), contract,
                                   preferred_element_type=out_dtype)

    def take(self, ids, dtype):
        return jnp.take(self.array, ids, axis=0).astype(dtype)

    def dequantize(self, dtype=jnp.float32):
        return self.array.astype(dtype)


def weight(w):
    """The one dispatch on weight kinds: an array becomes a `FloatWeight`; a quantized kind
    implements the members itself."""
    return FloatWeight(jnp.asarray(w)) if isinstance(w, jax.Array | np.ndarray) else w


def dense(x, w, dtype, *, transpose: bool = False, out_dtype=None):
    """x @ w for a kernel w [in, out] of any kind (x @ wᵀ for a table [out, in] with
    `transpose`, the tied head), computed in `dtype`, returned in `out_dtype` (default dtype)."""
    return weight(w).dot(x, dtype, transpose=transpose, out_dtype=out_dtype)


def param(module: nn.Module, name: str, init: Callable, shape: tuple, dtype):
    """module.param, checking a stored weight of any kind by its logical shape (Flax compares
    the first array leaf, which for an int8 kernel stored [out, in] is not the logical one)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{'/'.join(module.path)}/{name} has shape {tuple(value.shape)}; "
                             f"the model expects {tuple(shape)}")
        return value
    return module.param(name, init, shape, jnp.dtype(dtype))


class Embed(nn.Module):
    """An embedding table [num, features], read by rows."""

    num: int
    features: int
    config: GPTConfig

    def setup(self):
        self.embedding = param(self, "embedding", nn.initializers.normal(self.config.init_std),
                               (self.num, self.features), self.config.param_dtype)

    def __call__(self, ids):
        return weight(self.embedding).take(ids, self.config.dtype)


class Linear(nn.Module):
    """y = dense(x, kernel) + adapter(x) + bias. The kernel (in, out) is of any weight kind;
    the adapter is a LoRA pair {a, b} when the 'lora' collection holds one for this module,
    its input dropped at rate `adapter_dropout` while training (peft's
    `lora_B(lora_A(dropout(x)))`: the frozen path sees the whole x)."""

    features: int
    config: GPTConfig
    kernel_init: Callable = nn.initializers.normal(0.02)
    use_bias: bool = True
    deterministic: bool = True
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        c = self.config
        kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                       c.param_dtype)
        y = dense(x, kernel, c.dtype)
        if self.has_variable("lora", "a"):
            y = y + self.adapter(x, y.dtype)
        if self.use_bias and c.bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), c.param_dtype)
            y = y + bias.astype(c.dtype)
        return y

    def adapter(self, x, dtype):
        a, b = (self.get_variable("lora", name).astype(dtype) for name in ("a", "b"))
        if self.adapter_dropout > 0 and not self.deterministic:
            keep = 1.0 - self.adapter_dropout
            kept = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
            x = jnp.where(kept, x / keep, 0.0)
        return (x.astype(dtype) @ a) @ b


class Norm(nn.Module):
    """LayerNorm or RMSNorm, always computed in float32 (bf16 statistics drift). Its γ and β
    are float: quantization skips norm leaves (docs/int8.md)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x32 = x.astype(jnp.float32)
        d = x.shape[-1]
        if c.norm == "layernorm":
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + c.layer_norm_epsilon)
        y = y * self.param("scale", nn.initializers.ones, (d,), c.param_dtype)
        if c.norm == "layernorm" and c.bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,), c.param_dtype)
        return y.astype(c.dtype)
