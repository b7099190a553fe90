"""The measuring instruments of the experiments, checked against direct computations."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import kv_quant
from gpt2jax import apply, init_params
from gpt2jax.cache import init_cache
from gpt2jax.config import GPTConfig
from gpt2jax.quant.turboquant import TurboQuantConfig

CONFIG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=128)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_queries_and_keys_are_what_attention_caches(pos):
    """The probe's keys equal the float cache's after a prefill (RoPE included), so its
    queries, computed on the same line, are the ones attention uses."""
    config = CONFIG.replace(pos_embedding=pos)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    _, cache = apply(params, tokens, config, cache=init_cache(config, 2, 16))
    qk = kv_quant.queries_and_keys(params, config, tokens)
    assert len(qk) == config.n_layer
    for layer, (q, k) in enumerate(qk):
        assert q.shape == k.shape == (2 * config.n_head, 16, config.head_dim)
        np.testing.assert_allclose(k, cache.k[layer].reshape(k.shape), atol=1e-5)  # rows b*H+h


def test_token_by_token_float_cache_equals_one_forward():
    params = init_params(CONFIG, jax.random.key(0))
    windows = jax.random.randint(jax.random.key(2), (3, 24), 0, CONFIG.vocab_size)
    cached = kv_quant.cached_nll(params, windows, CONFIG, "float32", prompt=8)
    np.testing.assert_allclose(cached, kv_quant.reference_nll(params, windows, CONFIG, 8),
                               atol=1e-4)
    quantized = kv_quant.cached_nll(params, windows, CONFIG, TurboQuantConfig(bits=2), 8)
    assert not np.allclose(quantized, cached, atol=1e-4)  # the codes are what is read


def test_score_error_shrinks_with_bits():
    params = init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, CONFIG.vocab_size)
    qk = kv_quant.queries_and_keys(params, CONFIG, tokens)
    errors = [kv_quant.score_error(qk, CONFIG, TurboQuantConfig(bits=b))["score_rel_rmse"]
              for b in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    # TurboQuant (arXiv:2504.19874), Theorem 1: the relative MSE of a b-bit code is D_mse(b)
    # (0.36, 0.117, 0.03, 0.009 at d=64); a score error is that distortion seen through q, so
    # of order sqrt(D_mse)
    assert 0.3 < errors[0] < 0.9 and errors[3] < 0.15
    exact = kv_quant.score_error(qk, CONFIG, TurboQuantConfig(bits=4))
    assert 0 <= exact["attention_tv"] < 0.1
    assert jnp.isfinite(exact["score_rel_rmse"])


def test_profile_categories_on_a_compiled_train_step():
    """Every dense matmul of a real compiled step lands in its category: the Linear layers'
    dots, the fused head's dots, and an optimizer after the gradient."""
    from eval import profile_step
    from train import optim
    from train import step as step_lib

    config = CONFIG.replace(n_layer=2, block_size=16)
    optimizer = optim.make_optimizer(weight_decay=0.1)
    state = step_lib.init_state(init_params(config, jax.random.key(0)), optimizer, 0)
    x = jnp.zeros((1, 2, 16), jnp.int32)
    step = jax.jit(step_lib.make_train_step(config, optimizer))
    text = step.lower(state, x, x, np.float32(1e-3)).compile().as_text()
    table = profile_step.hlo_instructions(text)
    categories = {name: profile_step.categorize(name, op) for name, (_, op) in table.items()}
    for module in ("c_attn", "c_fc"):
        dots = [n for n, (_, op) in table.items() if f"/{module}/dot_general" in op]
        assert dots and {categories[n] for n in dots} == {"layer matmuls"}, module
    head = [n for n, (_, op) in table.items() if "CD,VD->CV" in op and "dot" in op]
    assert head and {categories[n] for n in head} == {"head matmuls"}
    assert "optimizer" in categories.values()


def test_readme_block_is_replaced_between_its_markers(tmp_path):
    from eval import common

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- t:begin -->\nold\n<!-- t:end -->\noutro\n")
    common.write_readme_block("t", "| new |", readme)
    assert readme.read_text() == "intro\n<!-- t:begin -->\n| new |\n<!-- t:end -->\noutro\n"
    with pytest.raises(ValueError, match="no '<!-- other:begin -->'"):
        common.write_readme_block("other", "x", readme)


def test_layer_gradient_probe_repeats_the_run_it_measures(tmp_path, monkeypatch):
    """The probe's run is the plain run (its checkpoints change no number): the same final
    val loss, and its last probe is the per-layer gradient at the plain run's final params;
    its first is the gradient at the seed's init. The work folder is relative, as
    `--work out/claims` is (orbax reads absolute paths only)."""
    from eval import norms_regime
    from eval.common import shakespeare_data, train_variant
    from eval.norms import block_grad_norms, recipe
    from gpt2jax import checkpoint
    from train.step import token_losses
    from train.trainer import initial_params

    monkeypatch.chdir(tmp_path)
    work = Path("work")
    cfg = recipe(True, shakespeare_data(work)).replace(max_steps=4)
    plain = train_variant(cfg, work, "plain")
    probes = norms_regime.layer_grads_over_training(cfg, work, "plain")
    assert probes["steps"] == [0, 1, 2, 3, 4]
    assert probes["val_loss"] == plain["val_loss"]
    x, y = norms_regime.probe_batch(Path(cfg.data), cfg.model.block_size)
    config, final = checkpoint.load(plain["config"]["out"])
    grad = jax.jit(jax.grad(lambda p: token_losses(p, x, y, config).mean()))
    np.testing.assert_allclose(probes["norms"][-1], block_grad_norms(grad(final)), rtol=1e-5)
    np.testing.assert_allclose(probes["norms"][0],
                               block_grad_norms(grad(initial_params(cfg)[1])), rtol=1e-5)
    assert len(probes["norms"][0]) == cfg.model.n_layer
    assert probes["norms"][0] != probes["norms"][-1]


def test_norms_regime_cells_parse_and_a_bad_one_is_named():
    from eval import norms_regime

    assert norms_regime._cell("3e-4:100") == (3e-4, 100)
    with pytest.raises(argparse.ArgumentTypeError, match="'3e-4' is not LR:WARMUP"):
        norms_regime._cell("3e-4")


def test_norms_regime_depth_names_its_own_json_and_bad_depths_are_named(tmp_path, capsys):
    from eval import norms_regime

    assert norms_regime.result_name(norms_regime.DEPTH) == "norms_regime.json"
    assert norms_regime.result_name(12) == "norms_regime_d12.json"  # never the claim's file
    with pytest.raises(argparse.ArgumentTypeError, match="'0' is not a number of layers"):
        norms_regime._depth("0")
    with pytest.raises(SystemExit, match="--depth 12 with --quick"):
        norms_regime.main(["--quick", "--depth", "12", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_norms_regime_plots_a_search_run_without_probes(tmp_path):
    """--no-probes leaves the arms without per-layer gradients: the plot draws the rest."""
    import json

    from eval import norms_regime
    from eval.common import RESULTS

    result = json.loads((RESULTS / "norms_regime.json").read_text())
    for arm in result["arms"].values():
        del arm["layer_grads"]
    norms_regime.plot(result, tmp_path / "search.png")
    assert (tmp_path / "search.png").stat().st_size > 0


def test_compile_profile_measures_the_flags_this_suite_runs_under():
    """`eval.profile_compile` is the evidence for conftest's XLA flags: it must time them."""
    import conftest

    from eval.profile_compile import FLAG_SETS

    if conftest.SUITE_XLA_FLAGS is None:
        pytest.skip("XLA_FLAGS was set by the caller, not by the suite")
    assert conftest.SUITE_XLA_FLAGS in FLAG_SETS.values()


def test_the_trained_threshold_is_the_data_s_add_one_unigram_loss(tmp_path):
    from eval.common import shakespeare_data, unigram_val_loss
    from eval.verdicts import UNIGRAM_LOSS
    from train import data as data_lib

    data = shakespeare_data(tmp_path)
    train, val = (np.asarray(data_lib.load_split(data, s)) for s in ("train", "val"))
    assert round(unigram_val_loss(train, val, 50257), 4) == UNIGRAM_LOSS
    # smoothing is a choice: the best add-k is lower, the rule says which one it uses
    assert unigram_val_loss(train, val, 50257, add=0.1) < UNIGRAM_LOSS - 0.05
    # and some is needed: 2% of val tokens never occur in train
    assert unigram_val_loss(train, val, 50257, add=1e-9) > UNIGRAM_LOSS + 0.3


def test_extrapolation_penalty_is_measured_against_the_context_s_second_half():
    from eval.positions import extrapolation_penalty

    T = 8
    # positions 1..2T-1: a high-loss start, 5.0 over the rest of the context, 5.2 past it
    curve = [9.0, 7.0, 6.0, 5.5] + [5.0] * (T - 5) + [5.2] * T
    assert len(curve) == 2 * T - 1
    assert extrapolation_penalty(curve, T) == pytest.approx(0.2)
    # against the whole context the start would hide the rise
    assert np.mean(curve[T:]) - np.mean(curve[: T - 1]) < 0
