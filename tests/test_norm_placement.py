"""Post-LN, DeepNorm and Double Norm: DeepNet's init (Wang et al., arXiv:2203.00555, Figure 2
and Table 1), Double Norm's block written out by hand (SPECS §10.4), and every placement can fit
a few batches, so a post-LN run stuck at the unigram plateau is an optimization result, not a
bug in the model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from trainutil import SHAKESPEARE

import gpt2jax
from gpt2jax import tokenizer
from gpt2jax.config import NORMS, GPTConfig
from gpt2jax.model import MLP, Attention, deepnorm_constants, init_params, param_spec
from train.step import token_losses


def test_deepnorm_init_is_xavier_normal_with_gain_beta():
    D, L = 128, 6
    params = init_params(GPTConfig(n_layer=L, n_head=4, n_embd=D, block_size=16, vocab_size=64,
                                   norm_placement="deepnorm"), jax.random.key(0))
    alpha, beta = deepnorm_constants(L)
    assert (alpha, beta) == pytest.approx(((2 * L) ** 0.25, (8 * L) ** -0.25))
    xavier = lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))  # noqa: E731
    stack = lambda *path: np.stack([_at(layer, path) for layer in params["h"].values()])
    h = {"attn": {"c_attn": {"kernel": stack("attn", "c_attn", "kernel")},
                  "c_proj": {"kernel": stack("attn", "c_proj", "kernel")}},
         "mlp": {"c_fc": {"kernel": stack("mlp", "c_fc", "kernel")},
                 "c_proj": {"kernel": stack("mlp", "c_proj", "kernel")}}}
    q, k, v = np.split(np.asarray(h["attn"]["c_attn"]["kernel"]), 3, axis=-1)
    expected = {"q": (q, xavier(D, D)), "k": (k, xavier(D, D)), "v": (v, beta * xavier(D, D)),
                "attention out": (h["attn"]["c_proj"]["kernel"], beta * xavier(D, D)),
                "mlp in": (h["mlp"]["c_fc"]["kernel"], beta * xavier(D, 4 * D)),
                "mlp out": (h["mlp"]["c_proj"]["kernel"], beta * xavier(4 * D, D))}
    for name, (w, std) in expected.items():  # >= 6 x 16k samples: the std to within 1%
        assert np.std(w) == pytest.approx(std, rel=0.01), name
        assert abs(np.mean(w)) < 0.01 * std, name


@pytest.fixture(scope="module")
def batch():
    """4 windows of 32 tokens of Tiny Shakespeare, renumbered 0..V-1 (V distinct tokens: a
    small vocabulary keeps the test cheap), V, and their unigram entropy in nats."""
    ids = np.asarray(tokenizer.encode(SHAKESPEARE.read_text()[:4000])[: 4 * 33])
    vocab, windows = np.unique(ids, return_inverse=True)
    windows = windows.reshape(4, 33).astype(np.int32)
    _, counts = np.unique(windows[:, 1:], return_counts=True)
    p = counts / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    return jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:]), len(vocab), unigram


def _norm(p, x, config):
    """LayerNorm or RMSNorm from its formula."""
    if config.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + config.layer_norm_epsilon) * p["scale"]
    return y + p["bias"] if "bias" in p else y


@pytest.mark.parametrize("norm", NORMS)
def test_double_norm_adds_the_normed_output_of_each_sublayer_of_its_normed_input(norm):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                       norm_placement="double", norm=norm)
    spec = param_spec(config)
    params = init_params(config, jax.random.key(0))
    # every gain and bias away from 1 and 0, so a missing or swapped norm changes the logits
    keys = iter(jax.random.split(jax.random.key(1), len(spec)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(next(keys), x.shape)
        if spec["/".join(k.key for k in path)].role == "norm" else x, params)
    assert {m for layer in params["h"].values() for m in layer} == {
        "ln_1", "attn", "ln_1_out", "ln_2", "mlp", "ln_2_out"}
    assert spec["h/1/ln_2_out/scale"].role == "norm" and "ln_f" in params

    tokens_BT = jax.random.randint(jax.random.key(2), (2, 12), 0, config.vocab_size)
    positions_BT = jnp.broadcast_to(jnp.arange(12), (2, 12))
    x = params["wte"]["embedding"][tokens_BT] + params["wpe"]["embedding"][positions_BT]
    for layer in params["h"].values():
        h, _ = Attention(config).apply({"params": layer["attn"]},
                                       _norm(layer["ln_1"], x, config), positions_BT, 0, None)
        x = x + _norm(layer["ln_1_out"], h, config)
        h = MLP(config).apply({"params": layer["mlp"]}, _norm(layer["ln_2"], x, config))
        x = x + _norm(layer["ln_2_out"], h, config)
    expected = _norm(params["ln_f"], x, config) @ params["wte"]["embedding"].T
    logits, _ = gpt2jax.forward(params, tokens_BT, config)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))


# Double Norm fits slower: its output norms lift each sublayer's output to unit RMS, 50x the
# embeddings' 0.02, so early on the token's own embedding barely reaches the head (measured:
# 1.55 nats after 60 steps, 0.03 after 150; the others 0.06-0.09 after 60).
FIT_STEPS = {"pre": 60, "post": 60, "deepnorm": 60, "double": 150}


@pytest.mark.parametrize("placement", FIT_STEPS)
def test_every_placement_fits_a_batch(placement, batch):
    x, y, vocab, unigram = batch
    config = GPTConfig(n_layer=4, n_head=2, n_embd=64, block_size=32, vocab_size=vocab,
                       norm_placement=placement)
    params = init_params(config, jax.random.key(0))
    opt = optax.adam(3e-3)

    @jax.jit
    def steps(params, state):
        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(
                lambda p: token_losses(p, x, y, config).mean())(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(step, (params, state), length=FIT_STEPS[placement])

    _, losses = steps(params, opt.init(params))
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    # far below the batch's unigram entropy (~4.2 nats): the model memorizes it through its
    # context
    assert losses[-1] < 0.25 * unigram, (placement, losses[::10], unigram)


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)
