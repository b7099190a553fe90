"""The model's switches: every variant runs, is causal, and bad input fails early and clearly."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt2jax
from gpt2jax.config import NORM_PLACEMENTS, NORMS, POS_EMBEDDINGS, GPTConfig
from gpt2jax.model import GPT, apply, param_breakdown

TINY = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


def pairwise(*factors) -> list[tuple]:
    """Combinations of the factors' values in which every pair of values of any two factors
    occurs at least once (greedy, deterministic): the full product's interactions between two
    switches at a quarter of its compiles (12 of 48 here)."""
    rows, product = [], list(itertools.product(*factors))
    pairs = lambda row: {(i, row[i], j, row[j])
                         for i, j in itertools.combinations(range(len(row)), 2)}
    todo = set().union(*map(pairs, product))
    while todo:
        row = max(product, key=lambda r: len(pairs(r) & todo))
        rows.append(row)
        todo -= pairs(row)
    return rows


VARIANTS = pairwise(POS_EMBEDDINGS, NORM_PLACEMENTS, NORMS, (True, False))


@pytest.mark.parametrize("pos,placement,norm,tied", VARIANTS)
def test_every_variant_forward_backward_and_causal(pos, placement, norm, tied):
    config = GPTConfig(**TINY, pos_embedding=pos, norm_placement=placement, norm=norm,
                       tie_embeddings=tied)
    B, T = 2, 12
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    variables = jax.jit(GPT(config).init)(jax.random.key(0), tokens)
    params, perturbations = variables["params"], variables["perturbations"]
    assert ("wpe" in params) == (pos == "learned")
    assert ("lm_head" in params) == (not tied)
    assert ("ln_f" in params) == (placement in ("pre", "double"))
    assert ("ln_2_out" in params["h"]["0"]) == (placement == "double")

    probe_positions = (0, T // 2)

    @jax.jit  # one forward and one (batched) backward per variant: compile time dominates
    def run(params, perturbations):
        def loss_and_logits(params, perturbations):
            logits, _ = apply(params, tokens, config, variables={"perturbations": perturbations})
            logp = jax.nn.log_softmax(logits)
            loss = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()
            return loss, logits

        (loss, logits), vjp = jax.vjp(loss_and_logits, params, perturbations)
        # cotangent 0: the training loss; cotangent 1+i: sum of the logits at probe_positions[i]
        loss_cot = jnp.array([1.0] + [0.0] * len(probe_positions))
        logit_cot = jnp.stack([jnp.zeros_like(logits)]
                              + [jnp.zeros_like(logits).at[:, t].set(1.0) for t in probe_positions])
        param_grads, input_grads = jax.vmap(lambda a, b: vjp((a, b)))(loss_cot, logit_cot)
        grads = jax.tree_util.tree_map(lambda g: g[0], param_grads)
        return loss, logits, grads, input_grads["embeddings"][1:]

    loss, logits, grads, input_grads = run(params, perturbations)
    chex.assert_shape(logits, (B, T, config.vocab_size))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite((loss, grads))
    chex.assert_trees_all_equal_shapes(grads, params)
    assert float(loss) == pytest.approx(np.log(config.vocab_size), abs=0.5)  # random init

    for t, g in zip(probe_positions, np.asarray(input_grads), strict=True):
        assert np.all(g[:, t + 1:] == 0), f"position {t} sees the future ({pos}, {placement})"
        assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0), "the past must matter"


def test_bfloat16_compute_keeps_params_and_logits_float32():
    config = GPTConfig(**TINY, dtype="bfloat16")
    params = gpt2jax.init_params(config, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    tokens = jnp.arange(10)[None] % config.vocab_size
    logits, _ = gpt2jax.forward(params, tokens, config)
    logits32, _ = gpt2jax.forward(params, tokens, config.replace(dtype="float32"))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, logits32, atol=0.05)


def test_dropout_needs_rng_and_changes_outputs():
    config = GPTConfig(**TINY, dropout=0.5)
    params = gpt2jax.init_params(config, jax.random.key(0))
    tokens = jnp.arange(8)[None]
    with pytest.raises(ValueError, match="rng"):
        gpt2jax.forward(params, tokens, config, deterministic=False)
    a, _ = gpt2jax.forward(params, tokens, config, deterministic=False, rng=jax.random.key(1))
    b, _ = gpt2jax.forward(params, tokens, config, deterministic=False, rng=jax.random.key(2))
    c, _ = gpt2jax.forward(params, tokens, config)
    assert not np.allclose(a, b) and not np.allclose(a, c)


@pytest.mark.parametrize(
    "name,total",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
     ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(name, total):
    counts = param_breakdown(GPTConfig.preset(name))
    assert counts["total"] == total
    parts = ("token_embedding", "position_embedding", "attention", "mlp", "norms", "lm_head")
    assert sum(counts[p] for p in parts) == total


def test_untied_adds_exactly_one_vocab_matrix():
    tied = param_breakdown(GPTConfig.gpt2())
    untied = param_breakdown(GPTConfig.gpt2(tie_embeddings=False))
    assert untied["total"] - tied["total"] == 50257 * 768 == untied["lm_head"]


def test_rope_and_sinusoidal_add_no_parameters():
    learned = param_breakdown(GPTConfig.gpt2())
    for pos in ("rope", "sinusoidal"):
        other = param_breakdown(GPTConfig.gpt2(pos_embedding=pos))
        assert learned["total"] - other["total"] == 1024 * 768


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny():
    config = GPTConfig(**TINY)
    return config, gpt2jax.init_params(config, jax.random.key(0))


@pytest.mark.parametrize("bad", [-1, 97, 10_000])
def test_token_ids_out_of_range(tiny, bad):
    config, params = tiny
    with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
        gpt2jax.forward(params, jnp.array([[1, 2, bad]]), config)


def test_sequence_longer_than_learned_positions(tiny):
    config, params = tiny
    with pytest.raises(ValueError, match="17 positions exceeds block_size=16"):
        gpt2jax.forward(params, jnp.zeros((1, 17), jnp.int32), config)


def test_rope_runs_past_block_size():
    config = GPTConfig(**TINY, pos_embedding="rope")
    params = gpt2jax.init_params(config, jax.random.key(0))
    logits, _ = gpt2jax.forward(params, jnp.zeros((1, 40), jnp.int32), config)
    chex.assert_tree_all_finite(logits)


def test_wrong_token_shape_and_dtype(tiny):
    config, params = tiny
    with pytest.raises(ValueError, match=r"int \[batch, time\]"):
        gpt2jax.forward(params, jnp.zeros((5,), jnp.int32), config)
    with pytest.raises(ValueError, match="integer ids"):
        gpt2jax.forward(params, jnp.zeros((1, 5), jnp.float32), config)
