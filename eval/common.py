"""What the experiments share: a small model trained on Tiny Shakespeare, its val tokens,
and the way results are written (JSON + PNG under eval/results/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from eval.perplexity import sliding_window_nll
from gpt2jax import checkpoint
from gpt2jax.config import GPTConfig
from train import config as train_config
from train import data as data_lib
from train.trainer import resolve_data, train

RESULTS = Path(__file__).resolve().parent / "results"


def trained_model(*, ckpt: str | None, quick: bool, out: str | Path,
                  minutes: float | None = None) -> tuple[GPTConfig, dict, np.ndarray]:
    """(config, params, val tokens): from a training checkpoint when given, else a run of the
    shakespeare recipe cut to `minutes` (quick: a smaller model, 1 minute)."""
    recipe = train_config.preset("shakespeare").replace(out=str(out))
    data_dir = resolve_data(recipe)  # Tiny Shakespeare encoded once into out/data
    val = np.asarray(data_lib.load_split(data_dir, "val"))
    if ckpt:
        config, params = checkpoint.load(ckpt)
        return config, params, val
    if quick:
        recipe = recipe.replace(
            model=recipe.model.replace(n_layer=2, n_head=2, n_embd=128, block_size=64),
            warmup_steps=20, eval_batches=1,
        )
    recipe = recipe.replace(data=str(data_dir), max_minutes=minutes or (1.0 if quick else 5.0),
                            eval_every=10_000, ckpt_every=10**9, sample_tokens=0)
    train(recipe, progress=True)
    config, params = checkpoint.load(Path(out))
    return config, params, val


def val_loss(params, config: GPTConfig, val_tokens, *, max_tokens: int | None = None) -> float:
    """Mean NLL (nats/token) over non-overlapping block-size windows of the val split."""
    tokens = val_tokens[:max_tokens] if max_tokens else val_tokens
    nll, _ = sliding_window_nll(params, config, tokens, progress=False)
    return nll


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def perplexity(nll: float) -> float:
    return math.exp(nll)
