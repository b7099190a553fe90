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
from gpt2jax.quant import int8

# target name -> (module path in the param tree, adapter slots)
TARGETS = {
    "c_attn": (("h", "attn", "c_attn"), ("",)),
    "c_attn.qv": (("h", "attn", "c_attn"), ("q_", "v_")),
    "attn.c_proj": (("h", "attn", "c_proj"), ("",)),
    "c_fc": (("h", "mlp", "c_fc"), ("",)),
    "mlp.c_proj": (("h", "mlp", "c_proj"), ("",)),
}
# the output columns each slot writes, as thirds of the fused qkv output (or all of it)
_SLOT_THIRDS = {"": None, "q_": 0, "v_": 2}
FACTOR_NAMES = tuple(slot + factor for slot in _SLOT_THIRDS for factor in "ab")  # leaf names


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

    def layer_tree(self, training: bool = False) -> dict:
        """What the model's 'lora' collection holds: the tree per layer (`h/i/attn/...`, as
        the params), every B multiplied by the scale, `(x A) (s B)`. In training with dropout
        each adapted module also gets `keep` = 1 - dropout, the chance that
        `add_adapter_outputs` keeps an entry of the module's input.

        Scaling B inside the jitted function gives B the gradient of `s (x A) B` exactly."""
        s = self.config.scale
        tree = jax.tree_util.tree_map_with_path(
            lambda path, x: x * s if str(path[-1].key).endswith("b") else x, self.tree
        )
        if training and self.config.dropout > 0:
            for target in self.config.targets:
                node = node_at(tree, TARGETS[target][0])
                node["keep"] = jnp.full((self.base.n_layer,), 1.0 - self.config.dropout)
        layer = lambda i: jax.tree.map(lambda x: x[i], tree["h"])
        return {**tree, "h": {str(i): layer(i) for i in range(self.base.n_layer)}}


def node_at(tree: dict, module: tuple[str, ...], create: bool = False) -> dict:
    """The dict at path `module` of a nested dict (made on the way when `create`)."""
    for name in module:
        tree = tree.setdefault(name, {}) if create else tree[name]
    return tree


def slot_shapes(config: GPTConfig, module: tuple[str, ...], slot: str, rank: int):
    D = config.n_embd
    d_in, d_out = {
        "c_attn": (D, 3 * D), "c_proj": (D, D) if module[1] == "attn" else (4 * D, D),
        "c_fc": (D, 4 * D),
    }[module[-1]]
    if slot:
        d_out = D  # one third of the fused qkv output
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


def check_compatible(adapters: Adapters, config: GPTConfig) -> None:
    if adapters.base != config:
        diff = {f.name: (getattr(adapters.base, f.name), getattr(config, f.name))
                for f in dataclasses.fields(config)
                if getattr(adapters.base, f.name) != getattr(config, f.name)}
        raise ValueError(
            f"these adapters were made for another base model (adapter base vs model: {diff}): "
            f"use the base model they were trained on"
        )


def count(adapters: Adapters, params=None) -> dict[str, float]:
    """Trainable adapter parameters, and their share of all parameters when params are given."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(adapters.tree))
    out = {"trainable": n}
    if params is not None:
        base = sum(x.size for x in jax.tree_util.tree_leaves(params))
        out.update(base=base, share_pct=100.0 * n / (n + base))
    return out


# ---------------------------------------------------------------------------- model hook


def add_adapter_outputs(module, x, y):
    """y + x A (sB) for each adapter slot `module` (a Linear) holds in the 'lora' collection.

    With a `keep` probability there (training with adapter dropout, `layer_tree`), x loses
    entries first, rescaled by 1/keep: peft's `lora_B(lora_A(dropout(x)))`, one mask per
    module shared by its slots; y, the frozen path, has already seen the whole x."""
    if module.has_variable("lora", "keep"):
        keep = module.get_variable("lora", "keep")
        kept = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
        x = jnp.where(kept, x / keep, 0.0)
    for slot, third in _SLOT_THIRDS.items():
        if not module.has_variable("lora", slot + "a"):
            continue
        a = module.get_variable("lora", slot + "a").astype(y.dtype)
        b = module.get_variable("lora", slot + "b").astype(y.dtype)
        delta = (x.astype(y.dtype) @ a) @ b
        if third is None:
            y = y + delta
        else:
            width = y.shape[-1] // 3
            y = y.at[..., third * width:(third + 1) * width].add(delta)
    return y


# ---------------------------------------------------------------------------- merge


def _kernel_deltas(adapters: Adapters):
    """(module path, column slice, ΔK [L, in, cols]) for every adapter slot."""
    s = adapters.config.scale
    for target in adapters.config.targets:
        module, slots = TARGETS[target]
        node = node_at(adapters.tree, module)
        for slot in slots:
            delta = s * jnp.einsum("lir,lro->lio", node[slot + "a"], node[slot + "b"])
            third = _SLOT_THIRDS[slot]
            width = delta.shape[-1]
            cols = slice(None) if third is None else slice(third * width, (third + 1) * width)
            yield module, cols, delta


def delta_norm(adapters: Adapters) -> float:
    """‖s·A·B‖_F over every adapted kernel and layer: how far the adapters moved the model."""
    return float(jnp.sqrt(sum(jnp.sum(d.astype(jnp.float32) ** 2)
                              for _, _, d in _kernel_deltas(adapters))))


def _add_to_kernel(kernel, cols: slice, delta, requantize: bool | None, where: str):
    """kernel[..., cols] + delta; an int8 kernel is dequantized first, then quantized again
    (same granularity and mode) or left float as `requantize` says."""
    width = len(range(*cols.indices(kernel.shape[-1])))
    if (*kernel.shape[:-1], width) != delta.shape:
        raise ValueError(
            f"{where}: adapter delta {tuple(delta.shape)} does not fit the kernel "
            f"{tuple(kernel.shape)}: merge into the base the adapters were made for")
    if not isinstance(kernel, int8.QTensor):  # jnp.asarray: hf.load gives numpy arrays
        return jnp.asarray(kernel).at[..., cols].add(delta)
    if requantize is None:
        raise ValueError(
            f"{where} is int8: pass requantize=True to round the merged kernel to int8 again "
            f"(int8 size, int8 error) or requantize=False to keep it float32 (exact, 4x bytes)")
    merged = jnp.asarray(kernel.dequantize()).at[..., cols].add(delta)
    if not requantize:
        return merged
    return int8.requantize_like(kernel, merged)


def _apply_deltas(params, adapters: Adapters, sign: float, requantize: bool | None):
    out = jax.tree_util.tree_map(lambda x: x, params)  # new dict nodes, shared leaves
    for module, cols, delta in _kernel_deltas(adapters):
        for i in range(adapters.base.n_layer):
            node = node_at(out["h"][str(i)], module[1:])
            node["kernel"] = _add_to_kernel(node["kernel"], cols, sign * delta[i], requantize,
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
