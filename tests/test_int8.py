"""INT8 weights: error bounds, exact byte counts, and the same forward on either tree."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt2jax
from gpt2jax.config import GPTConfig
from gpt2jax.quant import int8

SMALL = GPTConfig(vocab_size=211, block_size=32, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def small_params():
    return gpt2jax.init_params(SMALL, jax.random.key(0))


def _is_q(x):
    return isinstance(x, int8.QTensor)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_error_within_half_a_step_and_skipped_leaves_untouched(small_params, granularity):
    q = int8.quantize(small_params, granularity=granularity)
    flat_p = dict(jax.tree_util.tree_leaves_with_path(small_params))
    flat_q = dict(jax.tree_util.tree_leaves_with_path(q, is_leaf=_is_q))
    n_quantized = 0
    for path, leaf in flat_p.items():
        qleaf = flat_q[path]
        if int8.is_kernel_leaf(path):
            n_quantized += 1
            assert qleaf.values.dtype == jnp.int8
            assert int(jnp.max(jnp.abs(qleaf.values))) == 127  # absmax uses the full range
            err = jnp.abs(leaf - qleaf.dequantize())
            assert bool(jnp.all(err <= qleaf.scale / 2 + 1e-7))
            expected_scales = leaf.shape[-1] if granularity == "channel" else 1
            assert qleaf.scale.size == SMALL.n_layer * expected_scales
        else:
            assert leaf is qleaf or np.array_equal(leaf, qleaf)  # bitwise identical
            assert not _is_q(qleaf)
    assert n_quantized == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj (stacked over layers)


def test_per_channel_beats_per_tensor_on_gpt2_like_kernels():
    w = jax.random.normal(jax.random.key(1), (768, 3072)) * 0.02
    w = w * jnp.exp(jax.random.normal(jax.random.key(2), (3072,)) * 0.5)  # uneven columns
    rel = {g: float(jnp.linalg.norm(w - int8.quantize_array(w, granularity=g).dequantize())
                    / jnp.linalg.norm(w)) for g in ("channel", "tensor")}
    assert rel["channel"] < rel["tensor"] < 0.05


def test_124m_bytes_halve_exactly():
    config = GPTConfig.gpt2()
    shapes = jax.eval_shape(lambda: gpt2jax.init_params(config, jax.random.key(0)))
    qshapes = jax.eval_shape(lambda: int8.quantize(gpt2jax.init_params(config, jax.random.key(0))))
    # 84,934,656 int8 kernel values + 82,944 float32 column scales + 39,505,152 float params
    assert int8.nbytes(shapes) == 497_759_232
    assert int8.nbytes(qshapes) == 84_934_656 + 4 * 82_944 + 4 * 39_505_152 == 243_287_040


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_124m_forward_close_under_jit(tied):
    config = GPTConfig.gpt2(tie_embeddings=tied)
    params = gpt2jax.init_params(config, jax.random.key(0))
    q = int8.quantize(params)
    tokens = jax.random.randint(jax.random.key(1), (1, 32), 0, config.vocab_size)
    ref, _ = gpt2jax.forward(params, tokens, config)
    out, _ = gpt2jax.forward(q, tokens, config)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    # 48 kernels at ~0.77% each compound to ~2.2% of the (small) random-init logits
    assert 0 < rel < 0.03, rel
    # scale-after-matmul equals dequantize-then-matmul
    deq, _ = gpt2jax.forward(int8.dequantize(q), tokens, config)
    np.testing.assert_allclose(out, deq, atol=1e-4 * float(jnp.abs(ref).max()))


def test_norm_ablation_quantizes_norm_leaves(small_params):
    q = int8.quantize(small_params, skip=int8.skip_embeddings_and_biases)
    assert _is_q(q["h"]["ln_1"]["scale"]) and _is_q(q["ln_f"]["bias"])
    assert not _is_q(q["wte"]["embedding"]) and not _is_q(q["h"]["mlp"]["c_fc"]["bias"])
    # a trained-looking norm scale: the ablation's forward runs and differs from float
    trained = jax.tree_util.tree_map(lambda x: x, small_params)
    trained["h"]["ln_1"]["scale"] = 1 + 0.3 * jax.random.normal(jax.random.key(5), (2, 64))
    tokens = jnp.arange(16)[None]
    ref, _ = gpt2jax.forward(trained, tokens, SMALL)
    out, _ = gpt2jax.forward(int8.quantize(trained, skip=int8.skip_embeddings_and_biases),
                             tokens, SMALL)
    chex.assert_tree_all_finite(out)
    assert not np.allclose(out, ref)


def test_dequantize_round_trip(small_params):
    back = int8.dequantize(int8.quantize(small_params))
    assert not int8.is_quantized(back)
    chex.assert_trees_all_equal_structs(back, small_params)
    chex.assert_trees_all_close(back, small_params, atol=1e-3, rtol=0)  # absmax 0.08 / 254


def test_bad_input(small_params):
    q = int8.quantize(small_params)
    with pytest.raises(ValueError, match="h/attn/c_attn/kernel is already quantized"):
        int8.quantize(q)
    with_lora = {**small_params, "lora_a": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match="lora_a is a LoRA adapter: merge"):
        int8.quantize(with_lora)
    with pytest.raises(ValueError, match="granularity='row'"):
        int8.quantize(small_params, granularity="row")


def test_quantize_cli_checkpoint_round_trip_and_generate(tmp_path, small_params, capsys):
    from gpt2jax import checkpoint, quantize
    from gpt2jax.generate import generate

    checkpoint.save_params(tmp_path / "float", SMALL, small_params)
    quantize.main(["--ckpt", str(tmp_path / "float"), "--out", str(tmp_path / "int8")])
    assert "->" in capsys.readouterr().out
    config, loaded = checkpoint.load(tmp_path / "int8")
    assert config == SMALL and int8.is_quantized(loaded)
    expected = int8.quantize(small_params)
    tokens = jnp.arange(16)[None]
    a, _ = gpt2jax.forward(expected, tokens, SMALL)
    b, _ = gpt2jax.forward(loaded, tokens, SMALL)
    np.testing.assert_array_equal(a, b)
    # the same jitted generate runs on the int8 tree, cache or not
    prompts = [[1, 2, 3], [4, 5]]
    with_cache = generate(loaded, SMALL, prompts, max_new_tokens=6, key=jax.random.key(0),
                          temperature=0.0)
    without = generate(loaded, SMALL, prompts, max_new_tokens=6, key=jax.random.key(0),
                       temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(with_cache, without)


def test_quantization_experiment_rows(small_params):
    from eval.quantization import VARIANTS, run

    val = np.asarray(jax.random.randint(jax.random.key(9), (200,), 0, SMALL.vocab_size))
    result = run(small_params, SMALL, val)
    rows = result["variants"]
    assert list(rows) == list(VARIANTS)
    assert rows["float32"]["delta_loss_pct"] == 0.0
    assert rows["int8 per-channel (norms float)"]["bytes"] < rows["float32"]["bytes"]
    # quantizing the norms too saves only their 3 bytes each (scales cost a little back)
    saved = (rows["int8 per-channel (norms float)"]["bytes"]
             - rows["int8 per-channel + norms int8"]["bytes"])
    assert 0 < saved <= result["norm_bytes_saved_by_int8"]
