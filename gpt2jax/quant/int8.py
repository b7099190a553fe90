"""INT8 quantization as a parameter-tree transform (LLM.int8()'s absmax; SmoothQuant's migration).

`quantize(params)` returns a tree of the same structure in which every eligible matmul kernel
is a `QTensor` (int8 values + float32 scales); the same `forward` / `generate` run on it,
because a QTensor answers the weight-kind members that the layers call (`gpt2jax.layers`:
`dot`, `take`, `dequantize`, `shape`).

Two modes:
- `mode="weights"` (default): int8 kernels, float activations. The int8 values are cast to
  float before a float matmul: 4x smaller kernels, no faster (the cast is a float copy).
- `mode="w8a8"`: `Linear` also quantizes its input per token (symmetric absmax int8, at run
  time) and runs an int8 x int8 -> int32 dot, rescaled by token scale x column scale. On CPU
  its kernels are stored [out, in], the layout XLA:CPU's int8 dot reads fastest
  (`gpt2jax.backend`).
  GPT-2's LayerNorm outputs carry a few large channels that a per-token scale spends its
  range on; `smooth` (SmoothQuant, arXiv:2211.10438 §4) moves them into the kernels first.

By default only the linear layers' kernels are quantized (`c_attn`, `attn.c_proj`, `c_fc`,
`mlp.c_proj`): norm scales and biases, every bias, and the embeddings stay float.
`embeddings=True` quantizes `wte` with one scale per row (a row of `wte` is a column of the
tied head) and an untied `lm_head` as a kernel. Norm leaves are never quantized here; the
ablation that measures why is a transform of its own (`eval.quantization`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2jax import backend
from gpt2jax import params as params_lib

GRANULARITIES = ("channel", "tensor")
MODES = ("weights", "w8a8")


@struct.dataclass
class QTensor:
    """int8 `values` with float32 `scale` broadcastable to them: value ≈ values * scale.

    `activations`: "float" (weight-only) or "int8" (the input is quantized too, W8A8).
    `transposed`: values are stored [..., out, in] (W8A8 kernels); `shape` is the logical
    [..., in, out] either way. `values` comes first so Flax's shape check of a param sees
    the float tensor's shape where the layouts agree."""

    values: jax.Array
    scale: jax.Array
    activations: str = struct.field(pytree_node=False, default="float")
    transposed: bool = struct.field(pytree_node=False, default=False)

    @property
    def shape(self):
        shape = tuple(self.values.shape)
        return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = self.values.astype(dtype) * self.scale.astype(dtype)
        return jnp.swapaxes(w, -1, -2) if self.transposed else w

    def dot(self, x, dtype, *, transpose: bool = False, out_dtype=None) -> jax.Array:
        """x @ w (x @ wᵀ with `transpose`); the scale multiplies after the product (equal to
        dequantize-then-matmul, but the int8 tensor is what is read). W8A8 runs int8 x int8."""
        out_first = self.transposed != transpose  # values are [out, in]
        scale_O = self.scale.reshape(-1)  # one per output column, or one in all
        out_dtype = out_dtype or dtype
        if self.activations == "int8":
            return int8_dot(x, self.values, scale_O, out_first=out_first).astype(out_dtype)
        contract = (((x.ndim - 1,), (1 if out_first else 0,)), ((), ()))
        y = jax.lax.dot_general(x.astype(dtype), self.values.astype(dtype), contract,
                                preferred_element_type=out_dtype)
        return y * scale_O.astype(out_dtype)

    def take(self, ids, dtype) -> jax.Array:
        """Rows `ids` of a table quantized by rows: gathered as int8, then scaled."""
        rows = jnp.take(self.values, ids, axis=0).astype(dtype)
        return rows * jnp.take(self.scale, ids, axis=0).astype(dtype)

    def requantize(self, w: jax.Array) -> QTensor:
        """Float kernel `w` [..., in, out] quantized as this one was (granularity, mode)."""
        return quantize_array(w, granularity=granularity_of(self), activations=self.activations)


def is_kernel_leaf(path) -> bool:
    """A Linear's kernel (the param spec's role 'kernel')."""
    return params_lib.role(path) == "kernel"


def is_norm_leaf(path) -> bool:
    return params_lib.role(path) == "norm"


def absmax_quantize(w: jax.Array, axes: tuple[int, ...], bits: int = 8
                    ) -> tuple[jax.Array, jax.Array]:
    """(int8 values in [-m, m], m = 2^(bits-1) - 1, float32 scale) with one scale per slice
    over `axes`. Below 8 bits the values still take an int8 byte each (unpacked)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is invalid: symmetric absmax needs 2 to 8 bits")
    levels = 2 ** (bits - 1) - 1
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / levels, 1.0)  # an all-zero slice stays exactly 0
    return jnp.clip(jnp.round(w / scale), -levels, levels).astype(jnp.int8), scale


def quantize_array(w: jax.Array, *, granularity: str = "channel", kernel: bool = True,
                   activations: str = "float") -> QTensor:
    """Symmetric absmax int8 in [-127, 127].

    Kernels [..., in, out]: one scale per output column ("channel") or per matrix ("tensor");
    a leading layer axis keeps its own scales; with int8 activations on CPU the values are
    stored transposed, [..., out, in] (`gpt2jax.backend`). Vectors [..., D]: one per vector."""
    w = jnp.asarray(w, jnp.float32)
    if kernel and activations == "int8" and backend.cpu_layouts():
        values, scale = absmax_quantize(jnp.swapaxes(w, -1, -2),
                                        (-1,) if granularity == "channel" else (-2, -1))
        return QTensor(values, scale, activations, transposed=True)
    axes = (-2,) if kernel and granularity == "channel" else (-2, -1) if kernel else (-1,)
    return QTensor(*absmax_quantize(w, axes), activations)


def quantize_rows(table: jax.Array, activations: str = "float") -> QTensor:
    """An embedding table [V, D] with one scale per row: the lookup scales each gathered row,
    and as the tied head [V, D] a row scale is an output-column scale."""
    return QTensor(*absmax_quantize(jnp.asarray(table, jnp.float32), (-1,)), activations)


def granularity_of(q: QTensor) -> str:
    """How a kernel was quantized, read from its scale: one per column, or one in all."""
    return "channel" if q.scale.size > np.prod(q.scale.shape[:-2], dtype=int) else "tensor"


def _check_quantizable(params) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, QTensor)
    ):
        where = "/".join(params_lib.keys(path))
        if isinstance(leaf, QTensor):
            raise ValueError(f"{where} is already quantized: quantize the float params (or "
                             f"call dequantize first)")
        if any(k.startswith("lora") for k in params_lib.keys(path)):
            raise ValueError(f"{where} is a LoRA adapter: merge the adapters into the base "
                             f"(gpt2jax.lora.merge) before quantizing")


def quantize(params, *, mode: str = "weights", embeddings: bool = False,
             granularity: str = "channel"):
    """The param tree with every Linear kernel (the param spec's role 'kernel') replaced by a
    QTensor, plus `wte` (and an untied `lm_head`) when `embeddings`; the rest stays float."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: choose one of {MODES} ('weights': int8 "
                         f"kernels, float activations; 'w8a8': int8 activations too)")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is invalid: choose one of {GRANULARITIES}")
    _check_quantizable(params)
    activations = "int8" if mode == "w8a8" else "float"

    def convert(path, leaf):
        if embeddings and params_lib.keys(path) == ("wte", "embedding"):
            return quantize_rows(leaf, activations)
        if is_kernel_leaf(path) or (embeddings and params_lib.role(path) == "head"):
            return quantize_array(leaf, granularity=granularity, activations=activations)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)


def options(recorded: dict) -> dict:
    """quantize() keyword arguments from what a quantized checkpoint records
    ({"granularity": ..., "skip": "default", "mode": ..., "embeddings": ...}; checkpoints
    written before W8A8 lack the last two)."""
    if recorded.get("skip", "default") != "default":
        raise ValueError(
            f"this checkpoint was quantized with skip={recorded['skip']!r} (norm leaves int8), "
            f"an ablation the library no longer stores: quantize the float checkpoint again "
            f"(python -m gpt2jax.quantize), or run the ablation with python -m eval.quantization")
    return {"granularity": recorded["granularity"], "mode": recorded.get("mode", "weights"),
            "embeddings": recorded.get("embeddings", False)}


def dequantize(params):
    """Float tree back from a quantized one (float leaves pass through untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize() if isinstance(x, QTensor) else x, params,
        is_leaf=lambda x: isinstance(x, QTensor))


def is_quantized(params) -> bool:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QTensor))
    return any(isinstance(x, QTensor) for x in leaves)


def nbytes(tree) -> int:
    """Bytes held by every array of a tree (int8 values and their scales included).

    Works on shapes alone too (`jax.eval_shape` output), so big models need no memory."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------- SmoothQuant


def smoothing_factors(input_absmax_D, kernel_DO, alpha: float = 0.5):
    """SmoothQuant's per-channel s_j = max|X_j|^α / max_k|W_jk|^(1-α) (arXiv:2211.10438, eq. 4).

    X / s and s·W give the same product, with the activation outliers moved into W."""
    w_absmax_D = jnp.max(jnp.abs(kernel_DO), axis=-1)
    s = input_absmax_D ** alpha / jnp.maximum(w_absmax_D, 1e-8) ** (1 - alpha)
    return jnp.where(input_absmax_D > 0, jnp.maximum(s, 1e-5), 1.0)  # dead channels: keep


def smooth(params, input_absmax: dict, alpha: float = 0.5):
    """Float params with SmoothQuant's migration folded in: the norm before `c_attn` (`ln_1`)
    and before `c_fc` (`ln_2`) divided by s, those kernels' rows multiplied by s.

    An exact refactoring in float (logits unchanged to rounding); it only changes what int8
    loses. `input_absmax`: {"c_attn": [L, D], "c_fc": [L, D]} from `calibrate`. Pre-LN only:
    there each of these norms feeds exactly one Linear."""
    _check_quantizable(params)
    out = {}
    for i, h in params["h"].items():
        layer = dict(h)
        for norm, module, linear in (("ln_1", "attn", "c_attn"), ("ln_2", "mlp", "c_fc")):
            kernel = h[module][linear]["kernel"]
            s_D = smoothing_factors(jnp.asarray(input_absmax[linear])[int(i)], kernel, alpha)
            layer[norm] = {k: v / s_D for k, v in h[norm].items()}  # scale, LayerNorm bias
            layer[module] = {**layer[module], linear: {**h[module][linear],
                                                       "kernel": kernel * s_D[:, None]}}
        out[i] = layer
    return {**params, "h": out}


# ---------------------------------------------------------------------------- W8A8


def quantize_activations(x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (per-token) symmetric absmax int8: (int8 [N, D], float32 scale [N, 1])."""
    return absmax_quantize(x_ND.astype(jnp.float32), (-1,))


def int8_dot(x, values, scale_O, *, out_first: bool) -> jax.Array:
    """float32 x [..., in] times int8 `values` ([out, in] when `out_first`, else [in, out])
    through int8 x int8 -> int32, rescaled by token scale x `scale_O`.

    On CPU one row is padded to two (`gpt2jax.backend`)."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    x_ND = x.reshape(-1, d_in)
    n = x_ND.shape[0]
    if n == 1 and backend.cpu_layouts():
        x_ND = jnp.concatenate([x_ND, jnp.zeros_like(x_ND)])
    xq_ND, xs_N1 = quantize_activations(x_ND)
    acc_NO = jax.lax.dot_general(xq_ND, values, (((1,), (1 if out_first else 0,)), ((), ())),
                                 preferred_element_type=jnp.int32)
    y_NO = acc_NO.astype(jnp.float32) * xs_N1 * scale_O.reshape(1, -1)
    return y_NO[:n].reshape(*lead, -1)
