"""LoRA and rsLoRA adapters as their own pytree: the trainable partition over a frozen base.

An adapter on a Linear with kernel K (in, out) adds `s · (x A) B`, A (in, r), B (r, out),
s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA). A starts uniform in ±1/sqrt(in) (as
peft / loralib: a rank-independent distribution, which rsLoRA's argument needs), B at zero,
so the adapted model starts equal to the base.

The adapter tree mirrors the param paths, stacked over layers like the base:
`h/attn/c_attn/{a [L, D, r], b [L, r, 3D]}`; the q/v-only target of the LoRA paper holds two
adapters on the fused qkv kernel, `h/attn/c_attn/{q_a, q_b, v_a, v_b}`, writing only the q
and v thirds of its output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2jax._files import write_atomically
from gpt2jax.config import GPTConfig

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
        if self.dropout != 0.0:  # measured claims use none; the field keeps peft's shape
            raise ValueError(
                f"LoRAConfig.dropout={self.dropout!r}: adapter dropout is not implemented; "
                f"use 0.0 (regularize with the model's dropout instead)"
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

    def scaled_tree(self) -> dict:
        """The tree with every B multiplied by the scale: what the model adds, `(x A) (s B)`.

        Scaling B inside the jitted function gives B the gradient of `s (x A) B` exactly."""
        s = self.config.scale
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x * s if str(path[-1].key).endswith("b") else x, self.tree
        )


def _slot_shapes(config: GPTConfig, module: tuple[str, ...], slot: str, rank: int):
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
        a_shape, b_shape = _slot_shapes(config, module, slot, lora_config.rank)
        bound = 1.0 / math.sqrt(a_shape[1])
        node = tree
        for name in module:
            node = node.setdefault(name, {})
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
    """y + x A (sB) for each adapter slot `module` (a Linear) holds in the 'lora' collection."""
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
        node = adapters.tree
        for name in module:
            node = node[name]
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


def _apply_deltas(params, adapters: Adapters, sign: float):
    check_compatible(adapters, adapters.base)
    out = jax.tree_util.tree_map(lambda x: x, params)  # new dict nodes, shared leaves
    for module, cols, delta in _kernel_deltas(adapters):
        node = out
        for name in module:
            node = node[name]
        # jnp.asarray: hf.load gives numpy arrays, which have no .at
        node["kernel"] = jnp.asarray(node["kernel"]).at[..., cols].add(sign * delta)
    return out


def merge(params, adapters: Adapters):
    """Base params with K' = K + s A B folded in: the adapted model at no extra cost."""
    return _apply_deltas(params, adapters, +1.0)


def unmerge(params, adapters: Adapters):
    """Inverse of `merge` (to float rounding)."""
    return _apply_deltas(params, adapters, -1.0)


# ---------------------------------------------------------------------------- peft export


def to_peft(adapters: Adapters) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json dict, tensors) in peft's layout for transformers' GPT2LMHeadModel.

    peft adapts whole modules: the q/v-only pair becomes one rank-2r adapter on c_attn with a
    block-structured B (zero on k's third) and alpha chosen so peft's scale equals ours."""
    lc = adapters.config
    tensors: dict[str, np.ndarray] = {}
    r_peft = {}
    for target in lc.targets:
        module, slots = TARGETS[target]
        node = adapters.tree
        for name in module:
            node = node[name]
        hf_module = f"{module[1]}.{module[2]}"
        if slots == ("",):
            a, b = np.asarray(node["a"]), np.asarray(node["b"])
        else:  # A' = [A_q | A_v] (in, 2r); B' (2r, 3D) writes q's and v's thirds only
            a = np.concatenate([np.asarray(node["q_a"]), np.asarray(node["v_a"])], axis=-1)
            L, r, D = node["q_b"].shape
            b = np.zeros((L, 2 * r, 3 * D), np.float32)
            b[:, :r, :D] = node["q_b"]
            b[:, r:, 2 * D:] = node["v_b"]
        r_peft[hf_module] = a.shape[-1]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.transformer.h.{i}.{hf_module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # (r, in)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # (out, r)

    def peft_alpha(r_eff):  # peft scale alpha'/r' (or /sqrt(r')) must equal ours
        return lc.scale * (math.sqrt(r_eff) if lc.rslora else r_eff)

    ranks = sorted(set(r_peft.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": ranks[0],
        "lora_alpha": peft_alpha(ranks[0]),
        "rank_pattern": {m: r for m, r in r_peft.items() if r != ranks[0]},
        "alpha_pattern": {m: peft_alpha(r) for m, r in r_peft.items() if r != ranks[0]},
        "target_modules": sorted(r_peft),
        "use_rslora": lc.rslora,
        "lora_dropout": lc.dropout,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors


def save_peft(adapters: Adapters, path: str | os.PathLike) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained."""
    from safetensors.numpy import save_file

    config, tensors = to_peft(adapters)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "adapter_model.safetensors", lambda f: save_file(tensors, f))
    write_atomically(directory / "adapter_config.json",
                     lambda f: Path(f).write_text(json.dumps(config, indent=2)))
    return directory
