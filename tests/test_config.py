"""GPTConfig validation: each bad value is named with what is allowed."""

from __future__ import annotations

import pytest

from gpt2jax.config import PRESETS, GPTConfig


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(n_embd=100, n_head=3), r"n_embd=100 is not divisible by n_head=3"),
        (dict(n_embd=36, n_head=4, pos_embedding="rope"), r"even head dim.*36 / n_head=4 = 9"),
        (dict(pos_embedding="alibi"), r"pos_embedding='alibi' is invalid.*'learned'"),
        (dict(norm_placement="sandwich"), r"norm_placement='sandwich'.*'deepnorm'"),
        (dict(norm="batchnorm"), r"norm='batchnorm'.*'rmsnorm'"),
        (dict(dtype="float8"), r"dtype='float8'.*'bfloat16'"),
        (dict(n_layer=0), r"n_layer=0 is invalid: must be a positive integer"),
        (dict(vocab_size=-5), r"vocab_size=-5"),
        (dict(dropout=1.0), r"dropout=1.0 is invalid: must be in \[0, 1\)"),
        (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon=0.0"),
    ],
)
def test_invalid_configs_name_field_value_and_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**changes)


def test_presets_and_unknown_preset():
    assert GPTConfig.preset("gpt2") == GPTConfig()
    baby = GPTConfig.preset("baby")
    assert (baby.n_layer, baby.n_head, baby.n_embd, baby.block_size) == (6, 6, 384, 256)
    assert all(GPTConfig.preset(p).head_dim == 64 for p in PRESETS if p != "baby")
    with pytest.raises(ValueError, match=r"unknown preset 'gpt3'.*gpt2-medium"):
        GPTConfig.preset("gpt3")


def test_dict_round_trip_and_unknown_fields():
    config = GPTConfig.preset("baby", pos_embedding="rope", tie_embeddings=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown GPTConfig fields \['n_ctx'\]"):
        GPTConfig.from_dict({**config.to_dict(), "n_ctx": 5})
    hash(config)  # static argument of jit


def test_train_recipe_line_names_its_choices():
    from train import config as train_config

    cfg = train_config.preset("shakespeare")
    line = train_config.describe(cfg.replace(model=cfg.model.replace(tie_embeddings=False)))
    assert "rope positions" in line and "untied head" in line
    assert f"{cfg.batch_size} x {cfg.model.block_size} tokens per step" in line
    assert f"{cfg.max_minutes:g}-minute budget" in line
