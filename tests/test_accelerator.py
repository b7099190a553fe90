"""Accelerator readiness, checked on the CPU: attention through jax.nn.dot_product_attention
equals today's masked attention (causal, ragged cache lengths), the switch refuses what it
cannot do, the train CLI's compute dtype follows the platform, and the accelerator benchmark
script refuses to pass CPU figures off as a GPU's."""

from __future__ import annotations

import functools
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from gpt2jax.attention import uses_dot_product_attention
from gpt2jax.cache import init_cache
from gpt2jax.config import GPTConfig
from gpt2jax.model import apply, init_params
from train.__main__ import build_parser, config_from_args
from train.config import platform_dtype

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)


@functools.partial(jax.jit, static_argnums=3)
def _forward(params, tokens, cache, config):
    return apply(params, tokens, config, cache=cache)


@functools.partial(jax.jit, static_argnums=2)
def _grads(params, tokens, config):
    return jax.grad(lambda p: apply(p, tokens, config)[0].std())(params)


def _ragged_decode(params, tokens, config):
    """Prefill rows of 5 and 3 tokens (right-padded to 5), then 4 decode steps: logits [B, 9, V]
    of every position each row computed, through the cache."""
    cache = init_cache(config, 2, 16)
    assert cache.dot_product == (config.attention_impl == "dot_product_attention")
    prefill, cache = _forward(params, tokens[:, :5], cache, config)
    lengths = np.array([5, 3])
    cache = cache.replace(lengths=jnp.asarray(lengths, jnp.int32))
    steps = []
    for j in range(4):
        logits, cache = _forward(params, tokens[np.arange(2), lengths + j][:, None], cache, config)
        steps.append(logits)
    return np.concatenate([prefill, *steps], axis=1)


def test_dot_product_attention_equals_masked_attention_on_cpu():
    masked = GPTConfig(**TINY, pos_embedding="rope", attention_impl="masked")
    dpa = masked.replace(attention_impl="dot_product_attention")
    params = init_params(masked, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, masked.vocab_size)

    full = {c.attention_impl: np.asarray(_forward(params, tokens, None, c)[0])
            for c in (masked, dpa)}
    np.testing.assert_allclose(full["dot_product_attention"], full["masked"], atol=1e-6, rtol=0)
    grads = [jax.tree.leaves(_grads(params, tokens, c)) for c in (masked, dpa)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    cached = {c.attention_impl: _ragged_decode(params, tokens, c) for c in (masked, dpa)}
    np.testing.assert_allclose(cached["dot_product_attention"], cached["masked"], atol=1e-6,
                               rtol=0)
    # the cache path is causal per row: row 1's decode (positions 3..6) saw no pad
    np.testing.assert_allclose(cached["masked"][1, 5:8], full["masked"][1, 3:6], atol=1e-5)


def test_attention_switch_choices_and_refusals():
    bf16 = GPTConfig(**TINY, dtype="bfloat16")
    assert not uses_dot_product_attention(bf16)  # auto: cuDNN's kernel exists on CUDA only
    assert uses_dot_product_attention(bf16.replace(attention_impl="dot_product_attention"))
    assert not uses_dot_product_attention(bf16.replace(attention_impl="masked"))
    with pytest.raises(ValueError, match="dropout=0.1: set dropout=0, or attention_impl='auto'"):
        GPTConfig(**TINY, dropout=0.1, attention_impl="dot_product_attention")
    with pytest.raises(ValueError, match="attention_impl='flash' is invalid: allowed values"):
        GPTConfig(**TINY, attention_impl="flash")


def test_train_cli_compute_dtype_follows_the_platform():
    assert platform_dtype("cpu") == "float32"
    assert platform_dtype("gpu") == platform_dtype("tpu") == "bfloat16"
    parse = build_parser().parse_args
    assert config_from_args(parse([]), jax.default_backend()).model.dtype == "float32"
    assert config_from_args(parse([]), "gpu").model.dtype == "bfloat16"
    assert config_from_args(parse(["--dtype", "float32"]), "tpu").model.dtype == "float32"
    assert config_from_args(parse(["--attention", "masked"]), "gpu").model.attention_impl == \
        "masked"


def test_accelerator_bench_refuses_a_cpu(tmp_path):
    child = subprocess.run(["bash", "eval/accelerator_bench.sh", str(tmp_path / "out")],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert child.returncode == 2, child.stderr
    assert "JAX sees no GPU or TPU" in child.stderr and not (tmp_path / "out").exists()
