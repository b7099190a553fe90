"""INT8 weights: error bounds, exact byte counts, and the same forward on either tree."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("placement", ["pre", "double"])  # double: 4 norms per layer to skip
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_error_within_half_a_step_and_skipped_leaves_untouched(small_params, granularity,
                                                               placement):
    if placement != "pre":
        small_params = gpt2jax.init_params(SMALL.replace(norm_placement=placement),
                                           jax.random.key(0))
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
            assert qleaf.scale.size == expected_scales  # one layer's kernel
        else:
            assert leaf is qleaf or np.array_equal(leaf, qleaf)  # bitwise identical
            assert not _is_q(qleaf)
    assert n_quantized == 4 * SMALL.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer


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
def test_quantized_124m_forward_close_under_jit():
    # tied only: the untied head is checked on the small model (test_untied_head_*)
    config = GPTConfig.gpt2()
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


def test_norm_ablation_is_quantize_then_dequantize_in_eval(small_params):
    """The library never quantizes a norm leaf (the model's Norm reads float γ, β); the
    ablation stores them int8 and evaluates them rounded back."""
    from eval.quantization import as_evaluated, norms_at

    assert not _is_q(int8.quantize(small_params, embeddings=True)["h"]["0"]["ln_1"]["scale"])
    trained = jax.tree_util.tree_map(lambda x: x, small_params)
    for i, layer in trained["h"].items():  # trained-looking norm scales, so rounding shows
        layer["ln_1"]["scale"] = 1 + 0.3 * jax.random.normal(jax.random.key(int(i)), (64,))
    stored = norms_at(8)(trained, None)
    assert _is_q(stored["h"]["0"]["ln_1"]["scale"]) and _is_q(stored["ln_f"]["bias"])
    assert _is_q(stored["h"]["0"]["mlp"]["c_fc"]["kernel"])
    assert not _is_q(stored["wte"]["embedding"])
    assert not _is_q(stored["h"]["0"]["mlp"]["c_fc"]["bias"])
    evaluated = as_evaluated(stored)
    scale = evaluated["h"]["0"]["ln_1"]["scale"]
    assert not _is_q(scale) and _is_q(evaluated["h"]["0"]["mlp"]["c_fc"]["kernel"])
    np.testing.assert_array_equal(scale, stored["h"]["0"]["ln_1"]["scale"].dequantize())
    tokens = jnp.arange(16)[None]
    kernels_only, _ = gpt2jax.forward(int8.quantize(trained), tokens, SMALL)
    out, _ = gpt2jax.forward(evaluated, tokens, SMALL)
    chex.assert_tree_all_finite(out)
    assert not np.allclose(out, kernels_only)  # the rounded norms change the logits


def test_a_checkpoint_recorded_with_int8_norms_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="skip='norms_too'.*python -m gpt2jax.quantize"):
        int8.options({"granularity": "channel", "skip": "norms_too"})
    assert int8.options({"granularity": "tensor", "skip": "default"}) == {
        "granularity": "tensor", "mode": "weights", "embeddings": False}


def test_dequantize_round_trip(small_params):
    back = int8.dequantize(int8.quantize(small_params))
    assert not int8.is_quantized(back)
    chex.assert_trees_all_equal_structs(back, small_params)
    chex.assert_trees_all_close(back, small_params, atol=1e-3, rtol=0)  # absmax 0.08 / 254


def test_bad_input(small_params):
    q = int8.quantize(small_params)
    with pytest.raises(ValueError, match="h/0/attn/c_attn/kernel is already quantized"):
        int8.quantize(q)
    with_lora = {**small_params, "lora_a": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match="lora_a is a LoRA adapter: merge"):
        int8.quantize(with_lora)
    with pytest.raises(ValueError, match="granularity='row'"):
        int8.quantize(small_params, granularity="row")
    with pytest.raises(ValueError, match=r"mode='int4' is invalid: choose one of \('weights', "):
        int8.quantize(small_params, mode="int4")
    with pytest.raises(ValueError, match="h/0/attn/c_attn/kernel is already quantized"):
        int8.quantize(int8.quantize(small_params, mode="w8a8", embeddings=True), mode="w8a8")


def test_quantize_cli_checkpoint_round_trip_and_generate(tmp_path, small_params, capsys):
    from gpt2jax import checkpoint, quantize
    from gpt2jax.generation import generate

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
    calibration = np.asarray(jax.random.randint(jax.random.key(8), (64,), 0, SMALL.vocab_size))
    result = run(small_params, SMALL, val, calibration=calibration, new_tokens=16, n_prompts=2)
    rows = result["variants"]
    assert list(rows) == list(VARIANTS)
    assert rows["float32"]["delta_loss_pct"] == 0.0 and rows["float32"]["greedy_match"] == 1.0
    assert rows["w8a8 + SmoothQuant + wte int8"]["bytes"] < rows["w8a8"]["bytes"]
    assert rows["int8 per-channel (norms float)"]["bytes"] < rows["float32"]["bytes"]
    # quantizing the norms too saves only their 3 bytes each (scales cost a little back)
    saved = (rows["int8 per-channel (norms float)"]["bytes"]
             - rows["int8 per-channel + norms int8"]["bytes"])
    assert 0 < saved <= result["norm_bytes_saved_by_int8"]
    # 4-bit norms: held one per byte, so the bytes are int8's; the values are coarser
    assert (rows["int8 per-channel + norms 4-bit"]["bytes"]
            == rows["int8 per-channel + norms int8"]["bytes"])


def test_quantization_seeds_aggregate_per_variant():
    """Each variant's figures are the seeds' means, the per-seed values are kept in seed order,
    and the activation outliers are the largest per layer over the seeds."""
    from eval.quantization import aggregate

    def result(losses, outliers):
        rows = {name: {"val_loss": loss, "perplexity": float(np.exp(loss)), "bytes": 10,
                       "greedy_match": 1.0, "tokens_before_first_difference": 5.0,
                       "delta_loss_pct": 100 * (loss / losses[0] - 1), "size_vs_float32": 1.0}
                for name, loss in zip(("float32", "int8"), losses, strict=True)}
        return {"variants": rows, "activation_outliers": {"c_fc": outliers}, "norm_params": 3}

    merged = aggregate([result([4.0, 4.4], [1.0, 3.0]), result([5.0, 5.0], [2.0, 1.0])])
    int8_row = merged["variants"]["int8"]
    assert int8_row["val_losses"] == [4.4, 5.0] and int8_row["val_loss"] == pytest.approx(4.7)
    np.testing.assert_allclose(int8_row["delta_loss_pcts"], [10.0, 0.0])
    assert int8_row["delta_loss_pct"] == pytest.approx(5.0)
    assert merged["activation_outliers"] == {"c_fc": [2.0, 3.0]}
    assert (merged["seeds"], merged["norm_params"]) == (2, 3)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_absmax_quantize_at_fewer_bits(bits):
    w = jax.random.normal(jax.random.key(3), (3, 40)) * jnp.arange(1, 4)[:, None]
    values, scale = int8.absmax_quantize(w, (-1,), bits)
    levels = 2 ** (bits - 1) - 1
    assert values.dtype == jnp.int8 and scale.shape == (3, 1)
    assert int(jnp.abs(values).max()) == levels  # the absmax entry takes the top level
    np.testing.assert_allclose(scale[:, 0], jnp.abs(w).max(-1) / levels, rtol=1e-6)
    assert float(jnp.max(jnp.abs(values * scale - w) - scale / 2)) <= 1e-6  # round to nearest
    with pytest.raises(ValueError, match="bits=9 is invalid"):
        int8.absmax_quantize(w, (-1,), 9)


# ---------------------------------------------------------------------------- W8A8


def _reference_w8a8(x_ND, q):
    """The same quantized operands multiplied in float64: dequantized rows x dequantized W."""
    xq, xs = int8.quantize_activations(jnp.asarray(x_ND))
    x64 = np.asarray(xq, np.float64) * np.asarray(xs, np.float64)
    w64 = np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64)  # [out, in]
    return x64 @ w64.T


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_w8a8_dot_equals_float_reference_of_the_quantized_operands(rows, granularity):
    w = jax.random.normal(jax.random.key(0), (96, 160)) * 0.02
    x = jax.random.normal(jax.random.key(1), (rows, 96)) * jnp.linspace(0.1, 8, 96)
    q = int8.quantize_array(w, granularity=granularity, activations="int8")
    assert q.transposed and q.values.shape == (160, 96) and q.shape == (96, 160)
    y = np.asarray(jax.jit(lambda x, q: q.dot(x, jnp.float32))(x, q), np.float64)
    ref = _reference_w8a8(x, q)
    assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)
    # and it is W8A8: the int8 products differ from float x times the same int8 kernel
    assert not np.allclose(y, np.asarray(x) @ np.asarray(q.dequantize()), rtol=0, atol=1e-7)


def test_w8a8_per_token_scale_of_an_all_zero_row():
    q = int8.quantize_array(jax.random.normal(jax.random.key(0), (32, 48)), activations="int8")
    x = jnp.zeros((3, 32)).at[1].set(jax.random.normal(jax.random.key(1), (32,)))
    y = q.dot(x, jnp.float32)
    chex.assert_tree_all_finite(y)
    assert np.all(np.asarray(y)[[0, 2]] == 0) and np.any(np.asarray(y)[1] != 0)


def _outlier_model(config=SMALL):
    """A model with trained-looking input norms: two LayerNorm channels ~40x the rest, as
    GPT-2's LayerNorm outputs have (LLM.int8, arXiv:2208.07339 §3)."""
    params = gpt2jax.init_params(config, jax.random.key(3))
    gamma = jnp.ones(SMALL.n_embd).at[jnp.array([7, 41])].set(40.0)
    layers = {i: {**h, "ln_1": {**h["ln_1"], "scale": gamma}, "ln_2": {**h["ln_2"], "scale": gamma}}
              for i, h in params["h"].items()}
    return {**params, "h": layers}


@pytest.mark.parametrize("placement", ["pre", "double"])  # both normalize each sublayer's input
def test_smoothing_is_exact_in_float_and_helps_w8a8(placement):
    from gpt2jax.quantize import calibrate, smoothquant

    config = SMALL.replace(norm_placement=placement)
    params = _outlier_model(config)
    tokens = jax.random.randint(jax.random.key(4), (2, 32), 0, config.vocab_size)
    absmax = calibrate(params, config, tokens)
    chex.assert_shape([absmax["c_attn"], absmax["c_fc"]], (config.n_layer, config.n_embd))
    assert float(absmax["c_attn"][:, 7].min()) > 10 * float(jnp.median(absmax["c_attn"]))
    smoothed = smoothquant(params, config, np.asarray(tokens).ravel(), alpha=0.5)
    ref, _ = gpt2jax.forward(params, tokens, config)
    out, _ = gpt2jax.forward(smoothed, tokens, config)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))

    def err(tree):
        logits, _ = gpt2jax.forward(int8.quantize(tree, mode="w8a8"), tokens, config)
        return float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))

    assert err(smoothed) < 0.7 * err(params)  # measured 0.51: c_proj and the head stay as they were


def test_smoothing_refuses_post_ln_and_bad_alpha():
    from gpt2jax.quantize import calibrate, smoothquant

    post = SMALL.replace(norm_placement="post")
    with pytest.raises(ValueError, match="norm_placement='post'"):
        calibrate(gpt2jax.init_params(post, jax.random.key(0)), post, jnp.zeros((1, 8), int))
    with pytest.raises(ValueError, match="alpha=1.5 must be in"):
        smoothquant(_outlier_model(), SMALL, np.zeros(64, int), alpha=1.5)


@pytest.mark.parametrize("mode", ["weights", "w8a8"])
def test_embeddings_int8_one_tensor_for_lookup_and_head(small_params, mode):
    q = int8.quantize(small_params, mode=mode, embeddings=True)
    wte = q["wte"]["embedding"]
    assert _is_q(wte) and wte.values.dtype == jnp.int8
    chex.assert_shape([wte.values, wte.scale], [(SMALL.vocab_size, SMALL.n_embd),
                                                (SMALL.vocab_size, 1)])
    assert "lm_head" not in q  # tied: the head multiplies through the same int8 tensor
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, SMALL.vocab_size)
    ref, _ = gpt2jax.forward(small_params, tokens, SMALL)
    out, _ = gpt2jax.forward(q, tokens, SMALL)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.03, rel  # random init: ~0.4% per int8 tensor, compounding
    # the lookup scales the int8 rows: a model whose only int8 tensor is wte gives the
    # float model's logits with wte replaced by its dequantized self
    only_wte = {**small_params, "wte": {"embedding": wte}}
    deq = {**small_params, "wte": {"embedding": wte.dequantize()}}
    np.testing.assert_allclose(*(gpt2jax.forward(t, tokens, SMALL)[0] for t in (only_wte, deq)),
                               rtol=0, atol=2e-2 if mode == "w8a8" else 1e-5)


def test_untied_head_quantized_as_a_kernel():
    config = SMALL.replace(tie_embeddings=False)
    params = gpt2jax.init_params(config, jax.random.key(0))
    q = int8.quantize(params, mode="w8a8", embeddings=True)
    assert _is_q(q["lm_head"]) and q["lm_head"].shape == (SMALL.n_embd, SMALL.vocab_size)
    tokens = jnp.arange(20)[None]
    ref, _ = gpt2jax.forward(params, tokens, config)
    out, _ = gpt2jax.forward(q, tokens, config)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.03


def test_124m_bytes_with_embeddings_about_a_quarter():
    config = GPTConfig.gpt2()
    q = jax.eval_shape(lambda: int8.quantize(gpt2jax.init_params(config, jax.random.key(0)),
                                             mode="w8a8", embeddings=True))
    # kernels 84,934,656 int8 + 82,944 scales; wte 38,597,376 int8 + 50,257 row scales;
    # wpe, biases, norms 907,776 float32
    expected = 84_934_656 + 4 * 82_944 + 38_597_376 + 4 * 50_257 + 4 * 907_776
    assert int8.nbytes(q) == expected == 127_695_940
    assert expected <= 0.27 * 497_759_232


def _int8_converts(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """The convert instructions of `hlo` that turn an s8 array of one of `shapes` into float."""
    types = dict(re.findall(r"%([\w.-]+) = (\w+\[[\d,]*\])", hlo))
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= ([bf]\w*\d+)\[([\d,]*)\]\S* convert\(%([\w.-]+)\)", line)
        if not m or not types.get(m.group(3), "").startswith("s8["):
            continue
        dims = tuple(int(d) for d in types[m.group(3)][3:-1].split(",") if d)
        if tuple(d for d in dims if d != 1) in shapes:
            found.append(line.strip())
    return found


@pytest.mark.parametrize("mode", ["weights", "w8a8"])
def test_decode_program_keeps_int8_kernels_int8(small_params, mode):
    """The compiled generate (prefill + lax.scan decode) of a W8A8 model converts no int8
    kernel to float, inside the loop or hoisted before it; weight-only int8 does (which
    shows the check finds such a convert)."""
    from gpt2jax import generation as gen

    q = int8.quantize(small_params, mode=mode, embeddings=True)
    shapes = set()
    for leaf in jax.tree_util.tree_leaves(q, is_leaf=_is_q):
        if _is_q(leaf):
            dims = leaf.values.shape
            shapes |= {tuple(d for d in dims if d != 1), tuple(d for d in dims[-2:] if d != 1)}
    tokens_BP, lengths_B, sampling, static, cache = gen._setup(
        [[1, 2, 3]], SMALL, 8, 0.0, None, None, None, True, None)
    hlo = gen._generate.lower(q, tokens_BP, lengths_B, jax.random.key(0), sampling,
                              max_new_tokens=8, **static, **cache).compile().as_text()
    converts = _int8_converts(hlo, shapes)
    if mode == "w8a8":
        assert converts == [], converts
        int8_dots = re.findall(r"s32\[[\d,]*\]\S* dot\(", hlo)
        assert len(int8_dots) == 2 * (4 * SMALL.n_layer + 1)  # prefill + decode step, head too
    else:
        assert converts


def test_w8a8_checkpoint_round_trip_with_smoothing(tmp_path, small_params, capsys):
    from gpt2jax import checkpoint, quantize
    from gpt2jax.generation import generate

    text = tmp_path / "calib.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    checkpoint.save_params(tmp_path / "small", SMALL, small_params)
    argv = ["--mode", "w8a8", "--smooth", "0.5", "--calibration", str(text)]
    assert quantize.main(["--ckpt", str(tmp_path / "small"), "--out", str(tmp_path / "x"),
                          *argv]) == 2
    assert "out of range [0, 211)" in capsys.readouterr().err
    # a GPT-2 vocabulary, the rest tiny
    config = SMALL.replace(vocab_size=50257, n_layer=1, n_embd=32)
    small_params = gpt2jax.init_params(config, jax.random.key(0))
    checkpoint.save_params(tmp_path / "float", config, small_params)
    assert quantize.main(["--ckpt", str(tmp_path / "float"), "--out", str(tmp_path / "w8a8"),
                          "--mode", "w8a8", "--embeddings", "--smooth", "0.5",
                          "--calibration", str(text), "--calibration-tokens", "64"]) == 0
    loaded_config, loaded = checkpoint.load(tmp_path / "w8a8")
    assert loaded_config == config
    assert loaded["h"]["0"]["attn"]["c_attn"]["kernel"].activations == "int8"
    calib = quantize.calibration_tokens(str(text), 64)
    expected = int8.quantize(quantize.smoothquant(small_params, config, calib, 0.5),
                             mode="w8a8", embeddings=True)
    chex.assert_trees_all_equal(loaded, expected)
    a = generate(loaded, config, [[1, 2, 3]], max_new_tokens=6, key=jax.random.key(0),
                 temperature=0.0)
    b = generate(loaded, config, [[1, 2, 3]], max_new_tokens=6, key=jax.random.key(0),
                 temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_lora_merge_over_a_w8a8_base_stays_w8a8(small_params):
    from gpt2jax import lora

    q = int8.quantize(small_params, mode="w8a8")
    adapters = lora.init(lora.LoRAConfig(rank=2, alpha=4.0), SMALL, jax.random.key(1))
    adapters = adapters.replace(tree=jax.tree_util.tree_map(lambda a: a + 0.01, adapters.tree))
    merged = lora.merge(q, adapters, requantize=True)
    kernel = merged["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert kernel.activations == "int8" and kernel.transposed
    exact = lora.merge(int8.dequantize(q), adapters)["h"]["0"]["attn"]["c_attn"]["kernel"]
    error = float(jnp.max(jnp.abs(kernel.dequantize() - exact)))
    assert error <= float(kernel.scale.max()) / 2 + 1e-6


def test_w8a8_layouts_of_every_backend_give_the_same_logits(small_params, monkeypatch):
    """The CPU layouts (kernels stored [out, in], one row padded to two) are a choice of
    storage only: with them off (GPU, TPU) the same model gives the same logits."""
    from gpt2jax import backend

    tokens = jnp.arange(12)[None]
    cpu = int8.quantize(small_params, mode="w8a8", embeddings=True)
    cpu_logits, _ = gpt2jax.apply(cpu, tokens, SMALL)
    one_row, _ = gpt2jax.apply(cpu, tokens[:, :1], SMALL)
    monkeypatch.setattr(backend, "cpu_layouts", lambda: False)
    plain = int8.quantize(small_params, mode="w8a8", embeddings=True)
    kernel = plain["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert not kernel.transposed and kernel.values.shape == kernel.shape == (64, 192)
    np.testing.assert_allclose(gpt2jax.apply(plain, tokens, SMALL)[0], cpu_logits,
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(gpt2jax.apply(plain, tokens[:, :1], SMALL)[0], one_row,
                               rtol=0, atol=1e-5)
