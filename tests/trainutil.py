"""Shared pieces of the training tests: a tiny model, a small prepared corpus, a child runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import DATA_DIR, REPO

from gpt2jax.config import GPTConfig
from train import TrainConfig
from train import data as data_lib

SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"
TINY_MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


def small_corpus(directory: Path, chars: int = 40_000) -> Path:
    """The first `chars` characters of Tiny Shakespeare, prepared (about 12k tokens)."""
    text = directory / "small.txt"
    text.write_text(SHAKESPEARE.read_text()[:chars])
    data_lib.prepare(text, directory / "prepared", block_size=TINY_MODEL.block_size)
    return directory / "prepared"


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(
        model=TINY_MODEL, data=str(data), out=str(out), batch_size=4, max_steps=8,
        warmup_steps=2, lr=1e-2, min_lr=1e-3, eval_every=100, eval_batches=2, ckpt_every=4,
        sample_tokens=0, peak_flops=1e11,
    )
    return base.replace(**changes)


def cli_args(cfg: TrainConfig) -> list[str]:
    """`python -m train` arguments that give `cfg` back (the CLI's own flag tables)."""
    from train.__main__ import MODEL_FLAGS, TRAIN_FLAGS

    args = ["--tied" if cfg.model.tie_embeddings else "--untied",
            "--bias" if cfg.model.bias else "--no-bias", "--mesh", f"data={cfg.mesh_data}",
            "--max-minutes", str(cfg.max_minutes or 0), "--no-progress"]
    args += [a for flag, field, _, _ in MODEL_FLAGS
             for a in (flag, str(getattr(cfg.model, field)))]
    args += [a for flag, field, _ in TRAIN_FLAGS if field != "max_minutes"
             and getattr(cfg, field) is not None for a in (flag, str(getattr(cfg, field)))]
    return args + ["--fsdp"] * cfg.fsdp + ["--resume"] * cfg.resume


def run_child(cfg: TrainConfig, hook: str = "None", extra_env: dict | None = None,
              script: str | None = None) -> subprocess.CompletedProcess:
    """train(cfg, on_step=<hook>) in a fresh Python process (or a custom `script` body)."""
    body = script or textwrap.dedent(f"""
        import json, os, signal, sys
        from train import TrainConfig, train
        cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
        train(cfg, on_step={hook}, progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run([sys.executable, "-c", body, json.dumps(cfg.to_dict())], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def killed_then_resumed(cfg: TrainConfig, at_step: int, checkpoints: list[int]):
    """Train `cfg` in a child that SIGKILL ends at step `at_step` (no chance to clean up),
    check the checkpoints it left, then resume here: the resumed run's result."""
    import signal

    from gpt2jax.checkpoint import Checkpointer
    from train import train

    kill = f"lambda s, m: s == {at_step} and os.kill(os.getpid(), {int(signal.SIGKILL)})"
    child = run_child(cfg, kill)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert Checkpointer(Path(cfg.out) / "checkpoints").steps() == checkpoints
    return train(cfg.replace(resume=True), progress=False)

