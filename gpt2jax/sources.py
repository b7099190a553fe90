"""Where a model comes from: "ckpt:DIR" (a gpt2jax checkpoint, a LoRA fine-tune's merged into
its base), "hf:DIR" (a Hugging Face GPT-2 folder) or a hub name, and the identity of a LoRA
base (its source and the sha256 of its arrays, checked when the adapters are read back)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import checkpoint, hf, lora
from gpt2jax.checkpoint import CheckpointMismatchError, path_str
from gpt2jax.config import GPTConfig


def load_checkpoint(directory: str | os.PathLike) -> tuple[GPTConfig, dict]:
    """(config, params) of the newest readable checkpoint in `directory` (a checkpoint
    folder or a training run's), for sampling and evaluation (`python -m gpt2jax.sample
    --ckpt DIR`). A LoRA checkpoint gives its base with the adapters merged in (K + s·A·B:
    the adapted model at the base's speed; over an int8 base, K + s·A·B rounded to int8
    again)."""
    if not checkpoint.holds_adapters(directory):
        return checkpoint.load(directory)
    adapters, base = checkpoint.load_adapters(directory)
    return adapters.base, lora.merge(load_base(base, adapters.base), adapters, requantize=True)


def load_model(source: str, *, block_size: int | None = None) -> tuple[GPTConfig, dict]:
    """(config, params) from 'ckpt:DIR' (a gpt2jax checkpoint), 'hf:DIR' (a Hugging Face
    GPT-2 folder) or a hub name ('gpt2', 'openai-community/gpt2-medium', ...).

    block_size crops learned positions to a shorter context (as nanoGPT does); it never
    grows one."""
    if source.startswith("ckpt:"):
        config, params = load_checkpoint(source.removeprefix("ckpt:"))
    elif source.startswith("hf:"):
        config, params = hf.load(source.removeprefix("hf:"))
    elif source in hf.HUB_NAMES or source.startswith("openai-community/"):
        config, params = hf.load(source)
    else:
        raise ValueError(
            f"model source {source!r} is not understood: use hf:DIR (a Hugging Face GPT-2 "
            f"folder), ckpt:DIR (a gpt2jax checkpoint folder) or a hub name "
            f"({', '.join(hf.HUB_NAMES)})"
        )
    if block_size is not None and block_size < config.block_size:
        config = config.replace(block_size=block_size)
        if "wpe" in params:
            params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][:block_size]}}
    return config, params


def source_reference(source: str) -> str:
    """`source` with a relative DIR made absolute, so a checkpoint finds its base from any
    working directory."""
    for prefix in ("ckpt:", "hf:"):
        if source.startswith(prefix):
            return prefix + str(Path(source.removeprefix(prefix)).absolute())
    return source


def fingerprint(params) -> str:
    """sha256 over every leaf's path, shape, dtype and bytes: the identity of a base model.

    Taken over the blocks stacked on a leading axis (`h/attn/...` [L, ...], the layout of
    format 1), so a base keeps its identity across the layout change."""
    digest = hashlib.sha256()
    layers = [params["h"][str(i)] for i in range(len(params["h"]))]
    stacked = {**params, "h": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                           *layers)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
        array = np.asarray(leaf)
        digest.update(f"{path_str(path)}:{array.shape}:{array.dtype};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_base(reference: dict, config: GPTConfig) -> dict:
    """The frozen base a LoRA checkpoint refers to ({'source', 'sha256'}), checked to be the
    very model the adapters were trained on."""
    base_config, params = load_model(reference["source"], block_size=config.block_size)
    same_fields = {"dropout": config.dropout, "dtype": config.dtype,  # run-time choices
                   "attention_impl": config.attention_impl}
    if base_config.replace(**same_fields) != config:
        raise CheckpointMismatchError(
            f"the base at {reference['source']} is not the model these adapters were trained "
            f"on: its config is {base_config.to_dict()}, the adapters' {config.to_dict()}"
        )
    if fingerprint(params) != reference["sha256"]:
        raise CheckpointMismatchError(
            f"the base at {reference['source']} has changed since the adapters were trained "
            f"(sha256 of its arrays differs from {reference['sha256'][:12]}...): restore that "
            f"base, or fine-tune again from the new one"
        )
    return jax.tree.map(jnp.asarray, params)
