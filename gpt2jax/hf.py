"""Hugging Face GPT-2 checkpoints in and out.

HF's Conv1D stores kernels (in, out), our layout too, and our paths are its names: conversion
is a rename (`h/0/attn/c_attn/kernel` <-> `h.0.attn.c_attn.weight`), from the param spec.
Every expected tensor is consumed and shape-checked; anything left over is an error, not a
silent partial load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gpt2jax import model
from gpt2jax._files import write_atomically
from gpt2jax.config import GPTConfig

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# Non-parameter buffers of older checkpoints (the causal mask), not weights.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF's name for the leaf a path ends in: every matrix and gain is a `weight`
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------- config


def config_from_hf(hf: dict) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 `config.json` dict; unsupported variants raise."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"activation_function={act!r} is not supported: gpt2jax uses GPT-2's tanh GELU "
            f"('gelu_new')"
        )
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"n_inner={hf['n_inner']} is not supported: gpt2jax uses 4 * n_embd")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        raise ValueError("only GPT-2's attention scaling 1/sqrt(head_dim) is supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(config: GPTConfig) -> dict:
    if not config.gpt2_compatible:
        raise ValueError(
            f"Hugging Face GPT2LMHeadModel cannot express pos_embedding={config.pos_embedding!r}, "
            f"norm_placement={config.norm_placement!r}, norm={config.norm!r}, bias={config.bias}: "
            f"only learned positions, pre-LN LayerNorm with biases can be exported"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.init_std,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "scale_attn_weights": True,
        # GPT-2's <|endoftext|>, when the vocabulary has it
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
    }


# ---------------------------------------------------------------------------- tensors


def _hf_tensors(config: GPTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF tensor name (no `transformer.` prefix) -> (our path, HF's shape), from the param
    spec: a rename, `h/0/attn/c_attn/kernel` <-> `h.0.attn.c_attn.weight`; the untied head
    alone is stored transposed (nn.Linear's (out, in))."""
    tensors = {}
    for path, leaf in model.param_spec(config).items():
        if leaf.role == "head":
            tensors["lm_head.weight"] = (path, leaf.shape[::-1])
            continue
        *module, name = path.split("/")
        tensors[".".join([*module, _HF_LEAF[name]])] = (path, leaf.shape)
    return tensors


def params_from_state_dict(config: GPTConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our param tree from HF tensor names (with or without the `transformer.` prefix)."""
    named = {}
    for name, value in tensors.items():
        name = name.removeprefix("transformer.")
        if name.endswith(_BUFFER_SUFFIXES) and name.startswith("h."):
            continue
        named[name] = value
    if config.tie_embeddings:
        named.pop("lm_head.weight", None)  # tied: the same tensor as wte
    expected = _hf_tensors(config)
    missing = sorted(set(expected) - set(named))
    unexpected = sorted(set(named) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the config (n_layer={config.n_layer}, "
            f"n_embd={config.n_embd}, tied={config.tie_embeddings}): missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
        )
    for name, (_, shape) in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(named[name].shape)}, expected {shape}"
            )
    dtype = np.dtype(config.param_dtype) if config.param_dtype != "bfloat16" else np.float32
    params: dict = {}
    for name, (path, _) in expected.items():
        value = np.asarray(named[name], dtype=dtype)
        *parents, leaf = path.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value.T if name == "lm_head.weight" else value
    return params


def params_to_state_dict(config: GPTConfig, params) -> dict[str, np.ndarray]:
    """HF tensor names (GPT2LMHeadModel's: `transformer.` prefix, but `lm_head`) from our
    param tree."""
    config_to_hf(config)  # raises for configs GPT-2 cannot express
    out = {}
    for name, (path, _) in _hf_tensors(config).items():
        node = params
        for key in path.split("/"):
            node = node[key]
        if not hasattr(node, "shape") or not hasattr(node, "dtype"):
            raise ValueError(
                f"cannot export a {type(node).__name__} leaf: dequantize / merge adapters first"
            )
        value = np.asarray(node, dtype=np.float32)
        head = name == "lm_head.weight"
        out[name if head else f"transformer.{name}"] = np.ascontiguousarray(
            value.T if head else value)
    return out


# ---------------------------------------------------------------------------- files


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if single.exists() or index.exists():
        from safetensors.numpy import load_file

        files = [single] if single.exists() else sorted(
            {directory / f for f in json.loads(index.read_text())["weight_map"].values()}
        )
        tensors = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return tensors
    binary = directory / "pytorch_model.bin"
    if binary.exists():
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{binary} is a PyTorch checkpoint and torch is not installed: "
                f"install torch, or convert it to model.safetensors"
            ) from e
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(
        f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory}"
    )


def _resolve(path_or_name: str | os.PathLike) -> Path:
    path = Path(path_or_name)
    if path.is_dir():
        return path
    name = str(path_or_name)
    repo_id = HUB_NAMES.get(name, name if name.startswith("openai-community/") else None)
    if repo_id is None:
        raise FileNotFoundError(
            f"{name!r} is neither a local directory nor a known GPT-2 name "
            f"({', '.join(HUB_NAMES)}): pass a directory holding config.json and "
            f"model.safetensors (e.g. written by transformers' save_pretrained)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(
            f"loading {name!r} from the Hugging Face Hub needs huggingface_hub "
            f"(pip install 'gpt2jax[hub]'); offline, pass a local directory instead"
        ) from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # offline, no cache, HTTP errors: all end the same way
        raise OSError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            f"offline, pass a local directory with config.json and model.safetensors"
        ) from e


def load(path_or_name: str | os.PathLike) -> tuple[GPTConfig, dict]:
    """(config, params) from a HF GPT-2 directory, or a hub name like "gpt2" when online."""
    directory = _resolve(path_or_name)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: not a Hugging Face model directory")
    config = config_from_hf(json.loads(config_file.read_text()))
    return config, params_from_state_dict(config, _read_tensors(directory))


def save(config: GPTConfig, params, path: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors that GPT2LMHeadModel.from_pretrained loads.

    Each file is written to a temporary name and renamed, so a crash leaves no half file."""
    from safetensors.numpy import save_file

    hf_config = config_to_hf(config)
    tensors = params_to_state_dict(config, params)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "model.safetensors",
                     lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_atomically(directory / "config.json",
                     lambda f: Path(f).write_text(json.dumps(hf_config, indent=2)))
    return directory
