"""The param spec: `params.role` says what each leaf is, and it agrees with the Flax module
class that creates the leaf, for every switch that changes the tree."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest

from gpt2jax import params
from gpt2jax.config import GPTConfig
from gpt2jax.layers import Embed, Linear, Norm
from gpt2jax.model import GPT, param_breakdown, param_spec

TINY = dict(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
# which class makes which leaf, and the role that leaf has
MADE_BY = {(Embed, "embedding"): "embedding", (Linear, "kernel"): "kernel",
           (Linear, "bias"): "bias", (Norm, "scale"): "norm", (Norm, "bias"): "norm",
           (GPT, "lm_head"): "head"}


def _roles_from_the_modules(config: GPTConfig) -> dict[str, str]:
    classes = {}

    def record(call, args, kwargs, context):
        classes["/".join(context.module.path)] = type(context.module)
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: GPT(config).init(
            {"params": jax.random.key(0)}, jax.numpy.zeros((1, 4), jax.numpy.int32))["params"])
    roles = {}
    for path in params.describe(shapes):
        *module, name = path.split("/")
        roles[path] = MADE_BY[(classes["/".join(module)], name)]
    return roles


@pytest.mark.parametrize("changes", [
    {}, {"tie_embeddings": False}, {"pos_embedding": "rope", "norm": "rmsnorm"},
    {"bias": False, "norm_placement": "post"}, {"norm_placement": "deepnorm"},
    {"norm_placement": "double", "norm": "rmsnorm"},
])
def test_the_rule_agrees_with_the_modules(changes):
    config = GPTConfig(**TINY, **changes)
    spec = param_spec(config)
    assert {path: leaf.role for path, leaf in spec.items()} == _roles_from_the_modules(config)
    kernel = spec["h/1/attn/c_attn/kernel"]
    assert (kernel.shape, kernel.module, kernel.layer) == ((16, 48), "attn.c_attn", 1)
    assert spec["wte/embedding"].layer is None


def test_role_boundaries():
    assert params.role(("lm_head",)) == "head"
    assert params.role(("h", "3", "ln_2", "bias")) == "norm"  # a norm's bias is not a Linear's
    assert params.role(("h", "3", "mlp", "c_proj", "bias")) == "bias"
    with pytest.raises(ValueError, match=r"h/0/attn/c_attn/q_a is not a GPT param path"):
        params.role(("h", "0", "attn", "c_attn", "q_a"))
    with pytest.raises(ValueError, match="not a GPT param path"):
        params.role(("lm_head", "kernel"))


def test_breakdown_counts_from_the_spec():
    counts = param_breakdown(GPTConfig.preset("gpt2"))
    assert counts["total"] == 124_439_808  # GPT-2 small
    assert counts["token_embedding"] == 50257 * 768 and counts["lm_head"] == 0
    assert counts["per_block"] == 7_087_872 and counts["norms"] == 12 * 2 * 1536 + 1536
