"""Checkpoints written before the per-layer param form (format 1: blocks stacked under `h`)
still restore: a train state resumes and a model loads, with the same numbers.

The fixture was written by the commit named in its expected.json (MAKE.py.txt shows how)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import checkpoint, sources
from gpt2jax.config import GPTConfig
from gpt2jax.model import forward, init_params
from train import optim
from train import step as step_lib

FIXTURE = Path(__file__).parent / "fixtures" / "stacked_checkpoint"
CONFIG = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=16)
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
LOGITS = np.load(FIXTURE / "logits.npy")
TOKENS = np.arange(10, dtype=np.int32)[None]


def _assert_same_logits(logits):
    """Equal to float32 rounding: the fixture's logits came from the scanned layer stack."""
    np.testing.assert_allclose(np.asarray(logits), LOGITS, rtol=1e-5, atol=1e-6)


def _copy(tmp_path) -> Path:
    shutil.copytree(FIXTURE / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def test_a_stacked_train_state_resumes_per_layer(tmp_path):
    optimizer = optim.make_optimizer(weight_decay=0.1)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        jax.eval_shape(lambda: step_lib.init_state(init_params(CONFIG, jax.random.key(0)),
                                                   optimizer, 0)))
    ckpt = checkpoint.Checkpointer(_copy(tmp_path) / "checkpoints")
    state, meta = ckpt.restore(abstract, config=CONFIG)
    ckpt.close()
    assert meta["format"] == 1 and int(state["step"]) == 2
    assert sorted(state["params"]["h"]) == ["0", "1"]
    opt_sum = sum(float(jnp.abs(x.astype(jnp.float32)).sum())
                  for x in jax.tree_util.tree_leaves(state["opt_state"]))
    np.testing.assert_allclose(opt_sum, EXPECTED["opt_state_abs_sum"], rtol=1e-6)
    assert sources.fingerprint(state["params"]) == EXPECTED["fingerprint"]  # same bytes
    _assert_same_logits(forward(state["params"], TOKENS, CONFIG)[0])
    # the optimizer state goes on where it stopped: one more step runs on the restored tree
    train_step = jax.jit(step_lib.make_train_step(CONFIG, optimizer))
    x = jnp.asarray(TOKENS[:, None, :8].repeat(2, 1))
    new_state, metrics = train_step(state, x, (x + 1) % 97, np.float32(1e-2))
    assert np.isfinite(float(metrics["loss"])) and int(new_state["step"]) == 3


def test_a_stacked_checkpoint_loads_as_a_model(tmp_path):
    config, params = checkpoint.load(_copy(tmp_path))
    assert config == CONFIG
    assert sources.fingerprint(params) == EXPECTED["fingerprint"]
    _assert_same_logits(forward(params, TOKENS, config)[0])


def test_an_unrelated_error_during_restore_leaves_the_step_in_place(tmp_path, monkeypatch):
    """Only errors that mean damaged files (checkpoint.DAMAGE_ERRORS) move a step aside;
    a bug's error propagates as it is and the step stays where it was."""
    directory = _copy(tmp_path) / "checkpoints"

    def broken_restore(self, *args, **kwargs):
        raise RuntimeError("not the files' fault")

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", broken_restore)
    with pytest.raises(RuntimeError, match="not the files' fault"):
        checkpoint.load(directory)
    ckpt = checkpoint.Checkpointer(directory)
    with pytest.raises(RuntimeError, match="not the files' fault"):
        ckpt.restore({"params": {}}, config=CONFIG)
    ckpt.close()
    assert (directory / "2").is_dir() and not (directory / "corrupted").exists()
    assert RuntimeError not in checkpoint.DAMAGE_ERRORS and ValueError in checkpoint.DAMAGE_ERRORS


def test_a_lora_checkpoint_is_not_read_as_a_model(tmp_path):
    """checkpoint.load reads models; a LoRA fine-tune's folder names the loader that merges."""
    from gpt2jax import lora

    adapters = lora.init(lora.LoRAConfig(2, 4), CONFIG, jax.random.key(0))
    ckpt = checkpoint.Checkpointer(tmp_path / "lora")
    ckpt.save(1, {"params": adapters.tree, "step": np.zeros((), np.int32)}, config=CONFIG,
              extra={"lora": {"config": adapters.config.to_dict(),
                              "base": {"source": "ckpt:nowhere", "sha256": "0" * 64}}})
    ckpt.close()
    assert checkpoint.holds_adapters(tmp_path / "lora")
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"holds LoRA adapters, not a model: .*sources.load_checkpoint"):
        checkpoint.load(tmp_path / "lora")
    assert not checkpoint.holds_adapters(_copy(tmp_path / "model"))
