"""LoRA and rsLoRA adapters as their own pytree: the trainable partition over a frozen base.

An adapter on a Linear with kernel K (in, out) adds `s · (x A) B`, A (in, r), B (r, out),
s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA). A starts uniform in ±1/sqrt(in) (as
peft / loralib: a rank-independent distribution, which rsLoRA's argument needs), B at zero,
so the adapted model starts equal to the base.

The adapter tree mirrors the param paths with the layers stacked on a leading axis (the
adapters are small, and merging or exporting them is one einsum over the layers):
`h/attn/c_attn/{a [L, D, r], b [L, r, 3D]}`; the model reads it per layer, `h/i/attn/...`
(`Adapters.layer_tree`), as it reads its params. The q/v-only target of the LoRA paper holds two
adapters on the fused qkv kernel, `h/attn/c_attn/{q_a, q_b, v_a, v_b}`, writing only the q
and v thirds of its output.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from gpt2jax.config import GPTConfig
from gpt2jax.layers import FloatWeight, weight

# target name -> (module path in the param tree, adapter slots)
TARGETS = {
    "c_attn": (("h", "attn", "c_attn"), ("",)),
    "c_attn.qv": (("h", "attn", "c_attn"), ("q_", "v_")),
    "attn.c_proj": (("h", "attn", "c_proj"), ("",)),
    "c_fc": (("h", "mlp", "c_fc"), ("",)),
    "mlp.c_proj": (("h", "mlp", "c_proj"), ("",)),
}
# the output columns each slot writes, as thirds of the fused qkv output (or all of it)
SLOTS = ("", "q_", "v_")  # a whole module, or c_attn's q and v thirds
FACTOR_NAMES = tuple(slot + factor for slot in SLOTS for factor in "ab")  # leaf names


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = ("c_attn.qv",)
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank={self.rank!r} is invalid: must be a positive int")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r} is invalid: must be > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoRAConfig.targets={self.targets!r}: unknown target(s) {unknown}; choose from "
                f"{', '.join(TARGETS)}"
            )
        if "c_attn" in self.targets and "c_attn.qv" in self.targets:
            raise ValueError("LoRAConfig.targets: choose either 'c_attn' or 'c_attn.qv', not both")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"LoRAConfig.dropout={self.dropout!r} is invalid: the share of adapter inputs "
                f"dropped in training must be in [0, 1) (peft uses 0.05-0.1; 0 turns it off)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(**d)

    @property
    def scale(self) -> float:
        """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@struct.dataclass
class Adapters:
    """The trainable tree plus its (static) LoRAConfig and the base config it was made for."""

    tree: dict
    config: LoRAConfig = struct.field(pytree_node=False)
    base: GPTConfig = struct.field(pytree_node=False)

    def layer_tree(self) -> dict:
        """What the model's 'lora' collection holds: per layer, as the params
        (`h/i/attn/c_attn`), one pair {a [in, r'], b [r', out]} for each adapted Linear, b
        multiplied by the scale: the model adds `(x a) b` (`fused_factors`).

        Scaling B inside the jitted function gives B the gradient of `s (x A) B` exactly."""
        stacked: dict = {}
        for target in self.config.targets:
            module, _ = TARGETS[target]
            a, b = fused_factors(node_at(self.tree, module))
            node_at(stacked, module, create=True).update(a=a, b=self.config.scale * b)
        layer = lambda i: jax.tree.map(lambda x: x[i], stacked["h"])
        return {"h": {str(i): layer(i) for i in range(self.base.n_layer)}}

    def check_compatible(self, config: GPTConfig) -> None:
        """ValueError naming the differing fields unless these adapters were made for config."""
        if self.base != config:
            diff = {f.name: (getattr(self.base, f.name), getattr(config, f.name))
                    for f in dataclasses.fields(config)
                    if getattr(self.base, f.name) != getattr(config, f.name)}
            raise ValueError(
                f"these adapters were made for another base model (adapter base vs model: "
                f"{diff}): use the base model they were trained on")


def fused_factors(node: dict):
    """(A [L, in, r'], B [L, r', out]) of one adapted module: its own pair, or the q/v pair
    of `c_attn.qv` as one rank-2r pair, A' = [A_q | A_v] and B' block-structured so that it
    writes q's and v's thirds only (zero on k's): x A' B' = [x A_q B_q, 0, x A_v B_v]."""
    if "a" in node:
        return node["a"], node["b"]
    a = jnp.concatenate([node["q_a"], node["v_a"]], axis=-1)
    (L, r, D), dtype = node["q_b"].shape, node["q_b"].dtype
    zeros = jnp.zeros((L, r, D), dtype)
    b = jnp.concatenate([jnp.concatenate([node["q_b"], zeros, zeros], -1),
                         jnp.concatenate([zeros, zeros, node["v_b"]], -1)], axis=1)
    return a, b


def node_at(tree: dict, module: tuple[str, ...], create: bool = False) -> dict:
    """The dict at path `module` of a nested dict (made on the way when `create`)."""
    for name in module:
        tree = tree.setdefault(name, {}) if create else tree[name]
    return tree


def slot_shapes(config: GPTConfig, module: tuple[str, ...], slot: str, rank: int):
    """(A's shape [L, in, r], B's [L, r, out]) of one slot, from the param spec's kernel."""
    from gpt2jax.model import param_spec  # the model sits below; asked once per config

    d_in, d_out = param_spec(config)["/".join((module[0], "0", *module[1:], "kernel"))].shape
    if slot:
        d_out //= 3  # one third of the fused qkv output
    if rank > min(d_in, d_out):
        raise ValueError(
            f"LoRA rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of "
            f"{'/'.join(module)}{'.' + slot[0] if slot else ''}: a low-rank update cannot have "
            f"more rank than the matrix; use rank <= {min(d_in, d_out)}"
        )
    return (config.n_layer, d_in, rank), (config.n_layer, rank, d_out)


def init(lora_config: LoRAConfig, config: GPTConfig, key: jax.Array) -> Adapters:
    """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) per entry, B = 0: the adapted model equals the base."""
    tree: dict = {}
    slots = [(m, s) for t in lora_config.targets for m, ss in [TARGETS[t]] for s in ss]
    keys = jax.random.split(key, len(slots))
    for (module, slot), k in zip(slots, keys, strict=True):
        a_shape, b_shape = slot_shapes(config, module, slot, lora_config.rank)
        bound = 1.0 / math.sqrt(a_shape[1])
        node = node_at(tree, module, create=True)
        node[slot + "a"] = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound)
        node[slot + "b"] = jnp.zeros(b_shape, jnp.float32)
    return Adapters(tree=tree, config=lora_config, base=config)


def count(adapters: Adapters, params=None) -> dict[str, float]:
    """Trainable adapter parameters, and their share of all parameters when params are given."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(adapters.tree))
    out = {"trainable": n}
    if params is not None:
        base = sum(x.size for x in jax.tree_util.tree_leaves(params))
        out.update(base=base, share_pct=100.0 * n / (n + base))
    return out


# ---------------------------------------------------------------------------- merge


def _kernel_deltas(adapters: Adapters):
    """(module path, ΔK = s·A·B [L, in, out]) for every adapted module."""
    for target in adapters.config.targets:
        module, _ = TARGETS[target]
        a, b = fused_factors(node_at(adapters.tree, module))
        yield module, adapters.config.scale * jnp.einsum("lir,lro->lio", a, b)


def delta_norm(adapters: Adapters) -> float:
    """‖s·A·B‖_F over every adapted kernel and layer: how far the adapters moved the model."""
    return float(jnp.sqrt(sum(jnp.sum(d.astype(jnp.float32) ** 2)
                              for _, d in _kernel_deltas(adapters))))


def _add_to_kernel(kernel, delta, requantize: bool | None, where: str):
    """kernel + delta; a quantized kernel is dequantized first, then quantized again (same
    granularity and mode) or left float as `requantize` says."""
    if tuple(kernel.shape) != delta.shape:
        raise ValueError(
            f"{where}: adapter delta {tuple(delta.shape)} does not fit the kernel "
            f"{tuple(kernel.shape)}: merge into the base the adapters were made for")
    kernel = weight(kernel)
    if isinstance(kernel, FloatWeight):
        return kernel.array + delta
    if requantize is None:
        raise ValueError(
            f"{where} is int8: pass requantize=True to round the merged kernel to int8 again "
            f"(int8 size, int8 error) or requantize=False to keep it float32 (exact, 4x bytes)")
    merged = kernel.dequantize() + delta
    return kernel.requantize(merged) if requantize else merged


def _apply_deltas(params, adapters: Adapters, sign: float, requantize: bool | None):
    out = jax.tree_util.tree_map(lambda x: x, params)  # new dict nodes, shared leaves
    for module, delta in _kernel_deltas(adapters):
        for i in range(adapters.base.n_layer):
            node = node_at(out["h"][str(i)], module[1:])
            node["kernel"] = _add_to_kernel(node["kernel"], sign * delta[i], requantize,
                                            "/".join(("h", str(i), *module[1:])))
    return out


def merge(params, adapters: Adapters, *, requantize: bool | None = None):
    """Base params with K' = K + s A B folded in: the adapted model at no extra cost.

    An int8 base
    (`quant.int8.quantize`) is dequantized, summed, then rounded to int8 again
    (`requantize=True`) or kept float32 (`requantize=False`); it must be said, since the
    first changes the model by up to half an int8 step per weight and the second quadruples
    those kernels' bytes. Float kernels ignore `requantize`."""
    return _apply_deltas(params, adapters, +1.0, requantize)


def unmerge(params, adapters: Adapters, *, requantize: bool | None = None):
    """Inverse of `merge` (to float rounding; to int8 rounding when requantized)."""
    return _apply_deltas(params, adapters, -1.0, requantize)
