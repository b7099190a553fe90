"""peft interop: LoRA adapters to and from peft's files for transformers' GPT2LMHeadModel
(adapter_config.json + adapter_model.safetensors), with the q/v pair as one block-structured
rank-2r adapter on c_attn."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax._files import write_atomically
from gpt2jax.config import GPTConfig
from gpt2jax.lora.adapters import (
    TARGETS,
    Adapters,
    LoRAConfig,
    fused_factors,
    node_at,
    slot_shapes,
)


def to_peft(adapters: Adapters) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json dict, tensors) in peft's layout for transformers' GPT2LMHeadModel.

    peft adapts whole modules: the q/v-only pair becomes one rank-2r adapter on c_attn with a
    block-structured B (zero on k's third) and alpha chosen so peft's scale equals ours."""
    lc = adapters.config
    tensors: dict[str, np.ndarray] = {}
    r_peft = {}
    for target in lc.targets:
        module, _ = TARGETS[target]
        hf_module = f"{module[1]}.{module[2]}"
        a, b = (np.asarray(f, np.float32) for f in fused_factors(node_at(adapters.tree, module)))
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
        node_at(tree, TARGETS[target][0], create=True).update(slots)
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
    (_, want_in, _), (_, _, want_out) = slot_shapes(config, module, "", r)
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
