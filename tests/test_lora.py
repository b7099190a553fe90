"""LoRA / rsLoRA: identity at init, the scaling law in gradients, merge, and peft parity."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    assert n == 2 * 12 * 2 * 768 * 4 == 147_456  # SPECS §3.3: q and v, r = 4, 12 layers
    params = jax.eval_shape(lambda: gpt2jax.init_params(config, jax.random.key(0)))
    counts = lora.count(shapes, params)
    assert counts["trainable"] == n
    assert counts["share_pct"] == pytest.approx(100 * n / (n + 124_439_808))


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_adapters_and_unmerge_restores(base_params, rslora):
    adapters = _randomize_b(lora.init(lora.LoRAConfig(8, 16, ALL_TARGETS, rslora=rslora), BASE,
                                      jax.random.key(3)))
    tokens = _tokens()
    unmerged, _ = gpt2jax.forward(base_params, tokens, BASE, lora=adapters)
    base, _ = gpt2jax.forward(base_params, tokens, BASE)
    merged_params = lora.merge(base_params, adapters)
    merged, _ = gpt2jax.forward(merged_params, tokens, BASE)
    assert not np.allclose(unmerged, base, atol=1e-3)  # the adapters do something
    scale = float(jnp.abs(unmerged).max())
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * scale, rtol=0)
    chex.assert_trees_all_close(lora.unmerge(merged_params, adapters), base_params,
                                atol=1e-6, rtol=0)
    moved = jax.tree.map(lambda m, b: jnp.sum((m - b) ** 2), merged_params, base_params)
    assert lora.delta_norm(adapters) == pytest.approx(
        float(jnp.sqrt(sum(jax.tree.leaves(moved)))), rel=1e-3)


def test_qv_only_touches_q_and_v_columns(base_params):
    adapters = _randomize_b(lora.init(lora.LoRAConfig(4, 8), BASE, jax.random.key(4)))
    delta = (lora.merge(base_params, adapters)["h"]["attn"]["c_attn"]["kernel"]
             - base_params["h"]["attn"]["c_attn"]["kernel"])
    D = BASE.n_embd
    assert np.any(np.asarray(delta[..., :D])) and np.any(np.asarray(delta[..., 2 * D:]))
    assert not np.any(np.asarray(delta[..., D:2 * D])), "k's third must stay untouched"


def test_scale_values():
    assert [lora.LoRAConfig(r, 16).scale for r in (4, 16, 64, 256)] == [4, 1, 0.25, 0.0625]
    rs = [lora.LoRAConfig(r, 16, rslora=True).scale for r in (4, 16, 64, 256)]
    assert rs == [8, 4, 2, 1]


def test_rank_scaling_of_grad_b():
    """SPECS §2.5: ||∇B|| ∝ s·sqrt(r): LoRA shrinks by sqrt(4/256) = 0.125, rsLoRA stays flat."""
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=4, n_embd=256)
    params = gpt2jax.init_params(config, jax.random.key(0))
    tokens = _tokens((4, 16), vocab=97)

    def grad_b_norm(rank, rslora, seed):
        adapters = lora.init(lora.LoRAConfig(rank, 16, rslora=rslora), config,
                             jax.random.key(seed))
        g = jax.grad(_loss, argnums=1)(params, adapters, tokens, config).tree
        c_attn = g["h"]["attn"]["c_attn"]
        return float(jnp.sqrt(sum(jnp.sum(c_attn[k] ** 2) for k in ("q_b", "v_b"))))

    for rslora, expected in ((False, 0.125), (True, 1.0)):
        ratios = [grad_b_norm(256, rslora, s) / grad_b_norm(4, rslora, s) for s in range(4)]
        assert np.mean(ratios) == pytest.approx(expected, rel=0.2), (rslora, ratios)


# ---------------------------------------------------------------------------- peft parity


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("targets", [("c_attn.qv",), ALL_TARGETS])
def test_peft_loads_the_same_adapters(tmp_path, base_params, rslora, targets):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
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
