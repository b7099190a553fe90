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
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2jax._files import write_atomically
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
                node = _node(tree, TARGETS[target][0])
                node["keep"] = jnp.full((self.base.n_layer,), 1.0 - self.config.dropout)
        layer = lambda i: jax.tree.map(lambda x: x[i], tree["h"])
        return {**tree, "h": {str(i): layer(i) for i in range(self.base.n_layer)}}


def _node(tree: dict, module: tuple[str, ...], create: bool = False) -> dict:
    """The dict at path `module` of a nested dict (made on the way when `create`)."""
    for name in module:
        tree = tree.setdefault(name, {}) if create else tree[name]
    return tree


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
        node = _node(tree, module, create=True)
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
        node = _node(adapters.tree, module)
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
            node = _node(out["h"][str(i)], module[1:])
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
        node = _node(adapters.tree, module)
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
        if r_eff == lc.rank:  # as is: a peft adapter read by load_peft goes back unchanged
            return lc.alpha
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


# ---------------------------------------------------------------------------- peft import

# peft's module name in GPT2LMHeadModel -> our whole-module target
_FROM_HF = {f"{m[1]}.{m[2]}": t for t, (m, slots) in TARGETS.items() if slots == ("",)}
_PEFT_TENSOR = re.compile(r"(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\."
                          rf"({'|'.join(map(re.escape, _FROM_HF))})\.lora_([AB])\.weight")
# adapter_config.json keys read here, or that do not change what the saved factors compute
# (initialization schemes, bookkeeping, module selection the tensor names already state)
_PEFT_KNOWN = frozenset({
    "peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
    "lora_dropout", "bias", "lora_bias", "use_dora", "fan_in_fan_out", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights",
    "inference_mode", "task_type", "base_model_name_or_path", "revision", "auto_mapping",
    "peft_version", "megatron_config", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config",
})
_MERGE_FIX = ("merge it in peft instead (merge_and_unload(), then save_pretrained(DIR)) and "
              "load that model with gpt2jax.hf.load")


def load_peft(path: str | os.PathLike, config: GPTConfig) -> Adapters:
    """Adapters from a peft LoRA folder (adapter_config.json + adapter_model.safetensors)
    made on transformers' GPT2LMHeadModel of `config`'s shape: the inverse of `save_peft`.

    LoRA and rsLoRA on c_attn, attn.c_proj, c_fc and mlp.c_proj in every layer, with one
    rank and one scale across them (rank_pattern / alpha_pattern may state them per module).
    peft stores A (r, in) and B (out, r) whatever fan_in_fan_out says (GPT-2's Conv1D forces
    it on; it only transposes peft's merge). A c_attn adapter whose B writes nothing but q's
    and v's thirds (`save_peft`'s export of c_attn.qv) comes back as c_attn.qv. What these
    adapters cannot represent (DoRA, trained biases, other modules, some layers only,
    another base shape) raises a ValueError naming it and the way around."""
    directory = Path(path)
    where = f"peft adapter {directory}"
    settings = _peft_settings(directory, where)
    found = {}  # target -> (its slots' arrays, our rank, scale, peft's alpha if rank is ours)
    for hf_module, layers in _peft_factors(directory, where).items():
        a, b = _stack_layers(layers, config, hf_module, where)
        alpha = _peft_alpha(settings, hf_module, config.n_layer, where)
        r = a.shape[-1]
        scale = alpha / (math.sqrt(r) if settings.get("use_rslora") else r)
        qv = _qv_slots(a, b) if hf_module == "attn.c_attn" else None
        if qv is not None:
            found["c_attn.qv"] = (qv, r // 2, scale, None)
        else:
            found[_FROM_HF[hf_module]] = ({"a": a, "b": b}, r, scale, alpha)
    ranks = {target: r for target, (_, r, _, _) in found.items()}
    scales = {target: s for target, (_, _, s, _) in found.items()}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"{where} adapts its modules at different ranks {ranks}: gpt2jax "
                         f"adapters share one rank; {_MERGE_FIX}")
    if max(scales.values()) - min(scales.values()) > 1e-6 * max(scales.values()):
        raise ValueError(f"{where} scales its modules differently {scales}: gpt2jax adapters "
                         f"share one scale; {_MERGE_FIX}")
    rank, scale = next(iter(ranks.values())), next(iter(scales.values()))
    rslora = bool(settings.get("use_rslora"))
    alphas = [alpha for *_, alpha in found.values() if alpha is not None]
    lora_config = LoRAConfig(
        rank, alphas[0] if alphas else scale * (math.sqrt(rank) if rslora else rank),
        targets=tuple(t for t in TARGETS if t in found), rslora=rslora,
        dropout=float(settings.get("lora_dropout") or 0.0))
    tree: dict = {}
    for target, (slots, *_) in found.items():
        _node(tree, TARGETS[target][0], create=True).update(slots)
    return Adapters(tree=jax.tree.map(jnp.asarray, tree), config=lora_config, base=config)


def _peft_settings(directory: Path, where: str) -> dict:
    """adapter_config.json, refused unless it describes plain LoRA / rsLoRA."""
    file = directory / "adapter_config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{where} does not exist: pass the folder peft's "
                                f"save_pretrained wrote (adapter_config.json + "
                                f"adapter_model.safetensors)")
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: {directory} is not a peft adapter folder "
                                f"(peft's save_pretrained writes adapter_config.json there)")
    settings = json.loads(file.read_text())
    kind = settings.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{where} is a {kind} adapter, not LoRA (peft_type LORA): "
                         f"{_MERGE_FIX}")
    if settings.get("use_dora"):
        raise ValueError(f"{where} is DoRA (use_dora=true): its learned column magnitudes "
                         f"have no place in LoRA adapters; {_MERGE_FIX}")
    if settings.get("bias", "none") != "none" or settings.get("lora_bias"):
        raise ValueError(f"{where} trains biases (bias={settings.get('bias')!r}, lora_bias="
                         f"{settings.get('lora_bias')}): gpt2jax adapters hold A and B only; "
                         f"{_MERGE_FIX}")
    other = {k: v for k, v in settings.items() if v and k not in _PEFT_KNOWN}
    if other:
        raise ValueError(f"{where}: adapter_config.json sets {other}, which gpt2jax adapters "
                         f"cannot represent; {_MERGE_FIX}")
    return settings


def _peft_factors(directory: Path, where: str) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """{peft module name: {layer: {"A": (r, in), "B": (out, r)}}} from the safetensors file."""
    from safetensors.numpy import load_file

    file = directory / "adapter_model.safetensors"
    if not file.exists():
        pickled = (directory / "adapter_model.bin").exists()
        raise FileNotFoundError(
            f"{file} is missing" + (": the folder holds adapter_model.bin (a torch pickle); "
                                    "save it again with save_pretrained(DIR, "
                                    "safe_serialization=True)" if pickled else
                                    ": pass the folder peft's save_pretrained wrote"))
    factors: dict = {}
    for name, array in load_file(file).items():
        match = _PEFT_TENSOR.fullmatch(name)
        if match is None:
            raise ValueError(f"{where} holds {name}: gpt2jax adapts only "
                             f"{', '.join(_FROM_HF)} of GPT-2's blocks; {_MERGE_FIX}")
        factors.setdefault(match[2], {}).setdefault(int(match[1]), {})[match[3]] = array
    return factors


def _stack_layers(layers: dict, config: GPTConfig, hf_module: str, where: str):
    """(a [L, in, r], b [L, r, out]) float32, checked against `config`'s shape."""
    if sorted(layers) != list(range(config.n_layer)):
        raise ValueError(
            f"{where} adapts {hf_module} in layers {sorted(layers)}, but the model has "
            f"{config.n_layer} and gpt2jax adapters cover every layer: load the base it was "
            f"trained on, or {_MERGE_FIX}")
    shapes = {(tuple(f["A"].shape), tuple(f["B"].shape)) if set(f) == {"A", "B"} else None
              for f in layers.values()}
    if len(shapes) != 1 or None in shapes:
        raise ValueError(f"{where}: {hf_module}'s lora_A / lora_B differ by layer (or one is "
                         f"missing): {sorted(map(str, shapes))}; {_MERGE_FIX}")
    (r, d_in), (d_out, _) = shapes.pop()
    module = TARGETS[_FROM_HF[hf_module]][0]
    (_, want_in, _), (_, _, want_out) = _slot_shapes(config, module, "", r)
    if (d_in, d_out) != (want_in, want_out):
        raise ValueError(
            f"{where} was made for another base shape: its {hf_module} maps {d_in} -> {d_out}, "
            f"this model's {want_in} -> {want_out} (n_embd={config.n_embd}); load the base "
            f"model it was trained on")
    stack = lambda name: np.stack([np.asarray(layers[i][name], np.float32).T
                                   for i in range(config.n_layer)])
    return stack("A"), stack("B")


def _peft_alpha(settings: dict, hf_module: str, n_layer: int, where: str) -> float:
    """peft's lora_alpha for a module, as peft picks it (the first alpha_pattern key that
    matches the end of the module's name, else lora_alpha), the same in every layer."""
    patterns = settings.get("alpha_pattern") or {}
    alphas = set()
    for i in range(n_layer):
        name = f"transformer.h.{i}.{hf_module}"
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
        alphas.add(float(patterns[key] if key is not None else settings["lora_alpha"]))
    if len(alphas) > 1:
        raise ValueError(f"{where}: alpha_pattern gives {hf_module} alphas {sorted(alphas)} in "
                         f"different layers; gpt2jax adapters scale every layer alike; "
                         f"{_MERGE_FIX}")
    return alphas.pop()


def _qv_slots(a, b) -> dict | None:
    """c_attn.qv's slots when a c_attn adapter is its export (A' = [A_q | A_v]; B' zero on
    k's third and off its q and v blocks, and not all zero), else None."""
    r, D = a.shape[-1], b.shape[-1] // 3
    h = r // 2
    if r % 2 or not b.any() or b[..., D:2 * D].any() or b[:, :h, 2 * D:].any() \
            or b[:, h:, :D].any():
        return None
    return {"q_a": a[..., :h], "q_b": b[:, :h, :D], "v_a": a[..., h:], "v_b": b[:, h:, 2 * D:]}
