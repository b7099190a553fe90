"""LoRA / rsLoRA: identity at init, the scaling law in gradients, merge, and peft parity."""

from __future__ import annotations

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

import gpt2jax
from gpt2jax import lora
from gpt2jax.config import GPTConfig

BASE = GPTConfig(vocab_size=211, block_size=32, n_layer=2, n_head=4, n_embd=64)
ALL_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def base_params():
    return gpt2jax.init_params(BASE, jax.random.key(0))


def _tokens(shape=(2, 16), seed=1, vocab=BASE.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _randomize_b(adapters, seed=7, std=0.05):
    """Trained-looking adapters: B away from zero (at init the delta is exactly 0)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters.tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape) if str(p[-1].key).endswith("b") else x
           for (p, x), k in zip(leaves, keys, strict=True)]
    return adapters.replace(tree=jax.tree_util.tree_unflatten(treedef, new))


def _loss(params, adapters, tokens, config):
    logits, _ = gpt2jax.apply(params, tokens, config, lora=adapters)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()


@pytest.mark.parametrize("targets", [("c_attn.qv",), ALL_TARGETS])
@pytest.mark.parametrize("rslora", [False, True])
def test_init_is_the_base_model_and_grad_a_is_zero(base_params, targets, rslora):
    adapters = lora.init(lora.LoRAConfig(4, 16, targets, rslora=rslora), BASE, jax.random.key(2))
    tokens = _tokens()
    base, _ = gpt2jax.forward(base_params, tokens, BASE)
    adapted, _ = gpt2jax.forward(base_params, tokens, BASE, lora=adapters)
    np.testing.assert_array_equal(adapted, base)
    grads = jax.grad(_loss, argnums=1)(base_params, adapters, tokens, BASE)
    for path, g in jax.tree_util.tree_leaves_with_path(grads.tree):
        name = str(path[-1].key)
        if name.endswith("a"):
            assert not np.any(np.asarray(g)), f"grad of {name} must be exactly 0 at init"
        else:
            assert np.any(np.asarray(g)), f"grad of {name} must not vanish"


def test_trainable_count_matches_the_lora_formula():
    config = GPTConfig.gpt2()
    shapes = jax.eval_shape(lambda: lora.init(lora.LoRAConfig(4, 32), config, jax.random.key(0)))
    n = sum(x.size for x in jax.tree_util.tree_leaves(shapes.tree))
    # LoRA (arXiv:2106.09685) §5 / Table 3's GPT-2 setup: q and v, r = 4, 12 layers
    assert n == 2 * 12 * 2 * 768 * 4 == 147_456
    params = jax.eval_shape(lambda: gpt2jax.init_params(config, jax.random.key(0)))
    counts = lora.count(shapes, params)
    assert counts["trainable"] == n
    assert counts["share_pct"] == pytest.approx(100 * n / (n + 124_439_808))


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_adapters_and_unmerge_restores(base_params, rslora):
    _check_merge(BASE, base_params, rslora)


def test_merge_on_double_norm_rmsnorm():
    config = BASE.replace(norm_placement="double", norm="rmsnorm")
    _check_merge(config, gpt2jax.init_params(config, jax.random.key(0)), rslora=True)


def _check_merge(config, base_params, rslora):
    adapters = _randomize_b(lora.init(lora.LoRAConfig(8, 16, ALL_TARGETS, rslora=rslora), config,
                                      jax.random.key(3)))
    tokens = _tokens()
    unmerged, _ = gpt2jax.forward(base_params, tokens, config, lora=adapters)
    base, _ = gpt2jax.forward(base_params, tokens, config)
    merged_params = lora.merge(base_params, adapters)
    merged, _ = gpt2jax.forward(merged_params, tokens, config)
    assert not np.allclose(unmerged, base, atol=1e-3)  # the adapters do something
    scale = float(jnp.abs(unmerged).max())
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * scale, rtol=0)
    chex.assert_trees_all_close(lora.unmerge(merged_params, adapters), base_params,
                                atol=1e-6, rtol=0)
    moved = jax.tree.map(lambda m, b: jnp.sum((m - b) ** 2), merged_params, base_params)
    assert lora.delta_norm(adapters) == pytest.approx(
        float(jnp.sqrt(sum(jax.tree.leaves(moved)))), rel=1e-3)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_merge_over_an_int8_base_within_the_int8_bound(base_params, granularity):
    """Dequantize, add, re-quantize: each merged weight is within half its new int8 step of
    the exact sum; requantize=False gives the exact sum, whose logits equal the unmerged
    adapters' over the int8 base; numpy leaves merge alike."""
    from gpt2jax.quant import int8

    adapters = _randomize_b(lora.init(lora.LoRAConfig(8, 16, ALL_TARGETS), BASE,
                                      jax.random.key(13)))
    q = int8.quantize(base_params, granularity=granularity)
    with pytest.raises(ValueError, match=r"h/0/attn/c_attn is int8: pass requantize=True"):
        lora.merge(q, adapters)
    exact = lora.merge(int8.dequantize(q), adapters)
    merged = lora.merge(q, adapters, requantize=True)
    for path in (("attn", "c_attn"), ("mlp", "c_proj")):
        kernel = merged["h"]["1"][path[0]][path[1]]["kernel"]
        assert isinstance(kernel, int8.QTensor) and int8.granularity_of(kernel) == granularity
        error = np.abs(kernel.dequantize() - exact["h"]["1"][path[0]][path[1]]["kernel"])
        assert np.all(error <= kernel.scale / 2 * (1 + 1e-5)), path
    tokens = _tokens()
    unmerged, _ = gpt2jax.forward(q, tokens, BASE, lora=adapters)
    as_float, _ = gpt2jax.forward(lora.merge(q, adapters, requantize=False), tokens, BASE)
    np.testing.assert_allclose(as_float, unmerged, atol=1e-5 * float(np.abs(unmerged).max()))
    # host copies (the trainer's process_allgather gives numpy leaves) merge alike
    chex.assert_trees_all_equal(lora.merge(jax.tree.map(np.asarray, q), adapters,
                                           requantize=True), merged)
    other = lora.init(lora.LoRAConfig(8, 16), BASE.replace(n_embd=32, n_head=2),
                      jax.random.key(0))
    with pytest.raises(ValueError, match=r"does not fit the kernel.*the base the adapters"):
        lora.merge(base_params, other)


def test_qv_only_touches_q_and_v_columns(base_params):
    adapters = _randomize_b(lora.init(lora.LoRAConfig(4, 8), BASE, jax.random.key(4)))
    delta = (lora.merge(base_params, adapters)["h"]["0"]["attn"]["c_attn"]["kernel"]
             - base_params["h"]["0"]["attn"]["c_attn"]["kernel"])
    D = BASE.n_embd
    assert np.any(np.asarray(delta[..., :D])) and np.any(np.asarray(delta[..., 2 * D:]))
    assert not np.any(np.asarray(delta[..., D:2 * D])), "k's third must stay untouched"


def test_scale_values():
    assert [lora.LoRAConfig(r, 16).scale for r in (4, 16, 64, 256)] == [4, 1, 0.25, 0.0625]
    rs = [lora.LoRAConfig(r, 16, rslora=True).scale for r in (4, 16, 64, 256)]
    assert rs == [8, 4, 2, 1]


def test_rank_scaling_of_grad_b():
    """rsLoRA (arXiv:2312.03732) §3: ||∇B|| ∝ s·sqrt(r): LoRA shrinks by sqrt(4/256) = 0.125,
    rsLoRA stays flat."""
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=4, n_embd=256)
    params = gpt2jax.init_params(config, jax.random.key(0))
    tokens = _tokens((4, 16), vocab=97)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=3)  # one compile per rank

    def grad_b_norm(rank, rslora, seed):
        adapters = lora.init(lora.LoRAConfig(rank, 16, rslora=rslora), config,
                             jax.random.key(seed))
        g = grad(params, adapters, tokens, config).tree
        c_attn = g["h"]["attn"]["c_attn"]
        return float(jnp.sqrt(sum(jnp.sum(c_attn[k] ** 2) for k in ("q_b", "v_b"))))

    for rslora, expected in ((False, 0.125), (True, 1.0)):
        ratios = [grad_b_norm(256, rslora, s) / grad_b_norm(4, rslora, s) for s in range(4)]
        assert np.mean(ratios) == pytest.approx(expected, rel=0.2), (rslora, ratios)


# ---------------------------------------------------------------------------- dropout


def _with_dropout(adapters, p):
    return adapters.replace(config=dataclasses.replace(adapters.config, dropout=p))


def test_dropout_is_training_only_and_zero_is_no_dropout(base_params):
    adapters = _randomize_b(lora.init(lora.LoRAConfig(4, 16, ALL_TARGETS), BASE,
                                      jax.random.key(6)))
    tokens = _tokens()
    plain, _ = gpt2jax.forward(base_params, tokens, BASE, lora=adapters)
    train = lambda a, seed=0: gpt2jax.forward(base_params, tokens, BASE, lora=a,
                                              deterministic=False, rng=jax.random.key(seed))[0]
    np.testing.assert_array_equal(train(adapters), plain)  # p = 0: no mask, as before
    dropped = _with_dropout(adapters, 0.5)
    np.testing.assert_array_equal(gpt2jax.forward(base_params, tokens, BASE, lora=dropped)[0],
                                  plain)  # evaluation ignores p
    assert not np.allclose(train(dropped), plain, atol=1e-3)
    assert not np.allclose(train(dropped, 1), train(dropped, 0), atol=1e-3)  # masks follow rng
    with pytest.raises(ValueError, match=r"adapters'\) needs rng"):
        gpt2jax.forward(base_params, tokens, BASE, lora=dropped, deterministic=False)
    with pytest.raises(ValueError, match=r"dropout=1.0 is invalid.*\[0, 1\)"):
        lora.LoRAConfig(4, 16, dropout=1.0)


def test_dropout_masks_the_adapter_input_only_and_is_unbiased():
    """One Linear (c_fc of layer 0): over n masks the adapter output's mean is the
    no-dropout output within 5 standard errors per entry; the frozen x @ K never sees a
    mask (with B = 0 the training output is exactly x @ K); dropout is the Linear's argument,
    off when deterministic."""
    from gpt2jax.layers import Linear

    p, n = 0.3, 4000
    adapters = _randomize_b(lora.init(lora.LoRAConfig(4, 16, ("c_fc",)), BASE,
                                      jax.random.key(8)), std=0.2)
    layer0 = lambda adapters: adapters.layer_tree()["h"]["0"]["mlp"]["c_fc"]
    k_x, k_w, k_masks = jax.random.split(jax.random.key(9), 3)
    x = jax.random.normal(k_x, (6, BASE.n_embd))
    kernel = 0.1 * jax.random.normal(k_w, (BASE.n_embd, 4 * BASE.n_embd))
    linear = Linear(4 * BASE.n_embd, BASE, use_bias=False, deterministic=False,
                    adapter_dropout=p)

    def outputs(adapters, linear=linear):
        run = lambda key: linear.apply({"params": {"kernel": kernel}, "lora": layer0(adapters)},
                                       x, rngs={"dropout": key})
        return jax.vmap(run)(jax.random.split(k_masks, n))

    frozen = x @ kernel
    no_b = adapters.replace(tree=jax.tree.map(jnp.zeros_like, adapters.tree))
    np.testing.assert_array_equal(outputs(no_b)[0], frozen)
    w = layer0(adapters)
    w = w["a"] @ w["b"]  # s·A·B [in, out]
    delta = outputs(adapters) - frozen
    expected = x @ w
    std_error = jnp.sqrt(p / (1 - p) * (x ** 2) @ (w ** 2) / n)  # Var of one masked x @ w
    assert not np.allclose(delta[0], expected, atol=1e-3)  # one mask does drop
    z = np.abs(delta.mean(0) - expected) / std_error
    assert z.max() < 5 and 0.5 < z.mean() < 1.1, (z.max(), z.mean())  # E|N(0,1)| = 0.80
    evaluating = outputs(adapters, linear.clone(deterministic=True))
    np.testing.assert_allclose(evaluating[0], frozen + expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_a_and_b_through_dropout(base_params):
    adapters = _with_dropout(_randomize_b(lora.init(lora.LoRAConfig(4, 16, ALL_TARGETS), BASE,
                                                    jax.random.key(10))), 0.1)
    tokens = _tokens()

    def loss(adapters, key):
        logits, _ = gpt2jax.apply(base_params, tokens, BASE, lora=adapters,
                                  deterministic=False, rng=key)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()

    grad = jax.jit(jax.grad(loss))
    g_0, g_1 = grad(adapters, jax.random.key(0)).tree, grad(adapters, jax.random.key(1)).tree
    for (path, g), other in zip(jax.tree_util.tree_leaves_with_path(g_0), jax.tree.leaves(g_1),
                                strict=True):
        assert np.all(np.abs(np.asarray(g)).max(axis=(-2, -1)) > 0), path  # every layer
        assert not np.allclose(g, other), path  # each mask gives its own gradient


# ---------------------------------------------------------------------------- peft parity


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("targets", [("c_attn.qv",), ALL_TARGETS])
def test_peft_loads_the_same_adapters(tmp_path, base_params, rslora, targets):
    torch = require("torch")
    transformers = require("transformers")
    peft = require("peft")
    from gpt2jax import hf

    adapters = _randomize_b(lora.init(lora.LoRAConfig(4, 16, targets, rslora=rslora), BASE,
                                      jax.random.key(5)))
    hf.save(BASE, base_params, tmp_path / "base")
    lora.save_peft(adapters, tmp_path / "adapter")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    tokens = _tokens()
    with torch.no_grad():
        ref = model(torch.as_tensor(np.asarray(tokens))).logits.numpy()
    ours, _ = gpt2jax.forward(base_params, tokens, BASE, lora=adapters)
    base, _ = gpt2jax.forward(base_params, tokens, BASE)
    assert not np.allclose(ref, base, atol=1e-3)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- peft import


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random-init transformers GPT-2 of BASE's shape, saved, and read through hf.load."""
    torch = require("torch")
    transformers = require("transformers")
    from gpt2jax import hf

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=BASE.vocab_size, n_positions=BASE.block_size, n_embd=BASE.n_embd,
        n_layer=BASE.n_layer, n_head=BASE.n_head, bos_token_id=0, eos_token_id=0))
    directory = tmp_path_factory.mktemp("hf_base")
    model.save_pretrained(directory)
    config, params = hf.load(directory)
    assert config == BASE
    return directory, params


def _peft_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_load_peft_gives_peft_logits_and_round_trips(tmp_path, hf_base, rslora, targets):
    """peft's own adapter (get_peft_model, B moved off zero, saved) read by load_peft gives
    peft's logits; written back by save_peft it is the same tensors and the same model."""
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import load_file

    hf_dir, params = hf_base
    model = get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(hf_dir), LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=targets, use_rslora=rslora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.05)
    model.save_pretrained(tmp_path / "peft")
    adapters = lora.load_peft(tmp_path / "peft", BASE)
    expected_targets = ("c_attn",) if targets == ["c_attn"] else ALL_TARGETS
    assert adapters.config == lora.LoRAConfig(4, 16, expected_targets, rslora, dropout=0.1)

    tokens = _tokens()
    ref = _peft_logits(model.eval(), tokens)
    ours, _ = gpt2jax.forward(params, tokens, BASE, lora=adapters)
    assert not np.allclose(ref, gpt2jax.forward(params, tokens, BASE)[0], atol=1e-3)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    lora.save_peft(adapters, tmp_path / "back")
    before, after = (load_file(tmp_path / d / "adapter_model.safetensors")
                     for d in ("peft", "back"))
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k])
               for k in before)
    again = PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(hf_dir),
                                      tmp_path / "back").eval()
    np.testing.assert_array_equal(_peft_logits(again, tokens), ref)


@pytest.mark.parametrize("targets", [("c_attn.qv", "c_fc"), ("c_attn", "mlp.c_proj")])
def test_our_peft_export_reads_back_as_the_same_adapters(tmp_path, targets):
    adapters = _with_dropout(_randomize_b(lora.init(lora.LoRAConfig(4, 8, targets, rslora=True),
                                                    BASE, jax.random.key(11))), 0.05)
    lora.save_peft(adapters, tmp_path)
    back = lora.load_peft(tmp_path, BASE)
    assert back.config == adapters.config
    chex.assert_trees_all_equal(back.tree, adapters.tree)


def _edit_peft_folder(tmp_path, name, settings=None, tensors=None):
    """A copy of an exported adapter with adapter_config.json and tensors edited."""
    from safetensors.numpy import load_file, save_file

    source = tmp_path / "source"
    if not source.exists():
        lora.save_peft(_randomize_b(lora.init(lora.LoRAConfig(4, 8, ("c_attn", "c_fc")), BASE,
                                              jax.random.key(12))), source)
    config = json.loads((source / "adapter_config.json").read_text())
    arrays = load_file(source / "adapter_model.safetensors")
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config,
                                                                    **(settings or {})}))
    save_file(tensors(arrays) if tensors else arrays,
              tmp_path / name / "adapter_model.safetensors")
    return tmp_path / name


def test_load_peft_refuses_what_it_cannot_represent(tmp_path):
    def fails(folder, message, config=BASE):
        with pytest.raises(ValueError, match=message):
            lora.load_peft(folder, config)

    edit = functools.partial(_edit_peft_folder, tmp_path)
    fails(edit("dora", {"use_dora": True}), r"is DoRA \(use_dora=true\).*merge_and_unload")
    fails(edit("bias", {"bias": "lora_only"}), r"trains biases \(bias='lora_only'")
    fails(edit("ia3", {"peft_type": "IA3"}), r"is a IA3 adapter, not LoRA")
    fails(edit("saved", {"modules_to_save": ["lm_head"]}),
          r"sets \{'modules_to_save': \['lm_head'\]\}, which gpt2jax adapters cannot")
    fails(edit("wte", tensors=lambda t: {**t, "base_model.model.transformer.wte."
                                              "lora_embedding_A": np.zeros((4, 211), np.float32)}),
          r"holds base_model.model.transformer.wte.lora_embedding_A: gpt2jax adapts only "
          r"attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj")
    fails(edit("layer0", tensors=lambda t: {k: v for k, v in t.items() if ".h.1." not in k}),
          r"adapts attn.c_attn in layers \[0\], but the model has 2")
    fails(edit("shape"), r"another base shape: its attn.c_attn maps 64 -> 192, this model's "
                         r"32 -> 96", config=BASE.replace(n_embd=32))
    fails(edit("rank", tensors=lambda t: {k: v[:2] if "c_fc.lora_A" in k else v[:, :2]
                                          if "c_fc.lora_B" in k else v for k, v in t.items()}),
          r"different ranks \{'c_attn': 4, 'c_fc': 2\}")
    fails(edit("alpha", {"alpha_pattern": {"h.1.mlp.c_fc": 3.0}}),
          r"alpha_pattern gives mlp.c_fc alphas \[3.0, 8.0\] in different layers")
    fails(edit("scale", {"alpha_pattern": {"c_fc": 3.0}}), r"scales its modules differently")
    with pytest.raises(FileNotFoundError, match=r"does not exist: pass the folder peft's"):
        lora.load_peft(tmp_path / "missing", BASE)
    pickled = edit("bin")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"holds adapter_model.bin.*safe_serialization"):
        lora.load_peft(pickled, BASE)


# ---------------------------------------------------------------------------- bad input


def test_bad_configs_and_mismatched_base(base_params):
    with pytest.raises(ValueError, match=r"rank=0 is invalid"):
        lora.LoRAConfig(0, 8)
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['c_q'\]"):
        lora.LoRAConfig(4, 8, ("c_q",))
    with pytest.raises(ValueError, match=r"rank=65 exceeds min\(d_in, d_out\)=64"):
        lora.init(lora.LoRAConfig(65, 8), BASE, jax.random.key(0))
    other = BASE.replace(n_layer=3)
    adapters = lora.init(lora.LoRAConfig(4, 8), other, jax.random.key(0))
    with pytest.raises(ValueError, match=r"another base model.*'n_layer': \(3, 2\)"):
        gpt2jax.forward(base_params, _tokens(), BASE, lora=adapters)
