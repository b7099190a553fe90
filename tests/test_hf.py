"""Parity with Hugging Face's PyTorch GPT-2: same logits from the same (random) weights."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest
from conftest import require

torch = require("torch")
transformers = require("transformers")

import gpt2jax  # noqa: E402
from gpt2jax import hf  # noqa: E402
from gpt2jax.config import GPTConfig  # noqa: E402


def _hf_model(tmp_path, seed=0, **config):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    model.save_pretrained(tmp_path)  # safetensors
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def _tokens(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


SMALL_CONFIGS = [
    dict(n_layer=1, n_head=1, n_embd=16, vocab_size=50, n_positions=8),
    dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=32),
    dict(n_layer=3, n_head=2, n_embd=48, vocab_size=257, n_positions=24, tie_word_embeddings=False),
    dict(n_layer=2, n_head=3, n_embd=96, vocab_size=1000, n_positions=64, layer_norm_epsilon=1e-3),
]


@pytest.mark.parametrize("hf_config", SMALL_CONFIGS)
def test_logits_equal_hf_small(tmp_path, hf_config):
    model = _hf_model(tmp_path, **hf_config)
    config, params = hf.load(tmp_path)
    assert config.tie_embeddings == hf_config.get("tie_word_embeddings", True)
    tokens = _tokens(config.vocab_size, (3, config.block_size))
    logits, _ = gpt2jax.forward(params, tokens, config)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_logits_equal_hf_full_124m_shape(tmp_path):
    model = _hf_model(tmp_path)  # GPT-2 124M shape, random init
    config, params = hf.load(tmp_path)
    assert config == GPTConfig.gpt2(init_std=config.init_std)
    tokens = _tokens(config.vocab_size, (2, 64))
    logits, _ = gpt2jax.forward(params, tokens, config)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_hf_loads_same_logits(tmp_path, tied):
    config = GPTConfig(vocab_size=211, block_size=16, n_layer=2, n_head=2, n_embd=32,
                       tie_embeddings=tied)
    params = gpt2jax.init_params(config, jax.random.key(3))
    hf.save(config, params, tmp_path / "export")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    tokens = _tokens(config.vocab_size, (2, 16))
    logits, _ = gpt2jax.forward(params, tokens, config)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, tokens), atol=1e-4, rtol=0)
    # and back again: our load of our export is the identity
    config2, params2 = hf.load(tmp_path / "export")
    assert config2 == config
    chex.assert_trees_all_equal(jax.device_get(params), params2)


def test_pytorch_bin_checkpoint(tmp_path):
    model = _hf_model(tmp_path, **SMALL_CONFIGS[1])
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config, params = hf.load(tmp_path)
    tokens = _tokens(config.vocab_size, (1, 10))
    logits, _ = gpt2jax.forward(params, tokens, config)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_missing_and_misshapen_tensors_are_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    _hf_model(tmp_path, **SMALL_CONFIGS[1])
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight"))
    save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.weight'\]"):
        hf.load(tmp_path)
    save_file({**tensors, name: tensors[name][:, :5]}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"h.1.mlp.c_fc.weight has shape \(64, 5\)"):
        hf.load(tmp_path)
    save_file({**tensors, "transformer.h.9.ln_1.weight": tensors[name][0]},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['h.9.ln_1.weight'\]"):
        hf.load(tmp_path)


def test_unsupported_hf_config(tmp_path):
    _hf_model(tmp_path, **SMALL_CONFIGS[0])
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        hf.load(tmp_path)


@pytest.mark.parametrize("changes,named", [
    ({"pos_embedding": "rope"}, "pos_embedding='rope'"),
    ({"norm_placement": "double"}, "norm_placement='double'"),  # GPT-2 has no output norms
])
def test_export_refuses_configs_gpt2_cannot_express(tmp_path, changes, named):
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, **changes)
    params = gpt2jax.init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match=named):
        hf.save(config, params, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused export"


def test_hub_name_offline_gives_clear_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(OSError, match="offline, pass a local directory"):
        hf.load("gpt2")


def test_hub_name_without_huggingface_hub(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("no module named huggingface_hub")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"gpt2jax\[hub\]"):
        hf.load("gpt2-medium")


def test_unknown_name_or_missing_dir():
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a known GPT-2"):
        hf.load("/no/such/dir")
