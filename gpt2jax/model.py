"""GPT-2 as Flax Linen modules used as pure functions.

Param tree (paths are Hugging Face GPT-2's names, layer i under `h/i`, as `h.i.` there):

    wte/embedding [V, D]             wpe/embedding [block_size, D]   (learned positions only)
    h/0/ln_1/{scale,bias} [D]        h/0/attn/c_attn/{kernel [D, 3D], bias [3D]}
    h/0/attn/c_proj/...              h/0/ln_2/...    h/0/mlp/c_fc/...    h/0/mlp/c_proj/...
    h/0/ln_1_out/...  h/0/ln_2_out/...    (Double Norm only: the sublayers' output norms)
    h/1/...  ...  h/{L-1}/...
    ln_f/{scale,bias} [D]            (pre-LN, Double Norm)   lm_head [D, V]  (untied only)

Kernels are (in, out), the layout of Hugging Face's Conv1D: loading GPT-2 is a rename.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import params as params_lib
from gpt2jax import positions as pos_lib
from gpt2jax.attention import (
    causal_mask,
    dot_product_attention,
    masked_attention,
    uses_dot_product_attention,
)
from gpt2jax.config import GPTConfig
from gpt2jax.layers import Embed, Linear, Norm, dense, param, weight


def token_embedding_scale(config: GPTConfig) -> float:
    """sqrt(n_embd) under sinusoidal positions (Vaswani et al. scale the embeddings so), else 1.

    Unscaled, GPT-2's init (std 0.02) puts the tokens ~50x below the unit-amplitude sinusoids:
    baby, 200 steps, val 6.56 against learned positions' 5.63 (`python -m eval.positions`)."""
    return math.sqrt(config.n_embd) if config.pos_embedding == "sinusoidal" else 1.0


def deepnorm_constants(n_layer: int) -> tuple[float, float]:
    """DeepNet's decoder-only constants (arXiv:2203.00555, Table 1): residual scale
    alpha = (2N)^(1/4), init gain beta = (8N)^-1/4."""
    return (2 * n_layer) ** 0.25, (8 * n_layer) ** -0.25


def _scaled_normal(std: float):
    """N(0, std) init."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def xavier_normal(*gains: float) -> Callable:
    """Xavier-normal init of a kernel made of len(gains) equal column blocks (c_attn's q, k,
    v), each a (fan_in, fan_out) matrix of std gain·sqrt(2 / (fan_in + fan_out)): DeepNet's
    init (Wang et al., arXiv:2203.00555, Figure 2), gain beta for v, the attention output and
    the MLP, gain 1 for q and k."""

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = shape[-2], shape[-1] // len(gains)
        std = jnp.repeat(jnp.asarray(gains, jnp.float32), fan_out)
        std = std * math.sqrt(2 / (fan_in + fan_out))
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def _residual_init(c: GPTConfig) -> Callable:
    """Init of the projections that write into the residual stream."""
    if c.norm_placement == "deepnorm":
        return xavier_normal(deepnorm_constants(c.n_layer)[1])
    return _scaled_normal(c.init_std / math.sqrt(2 * c.n_layer))  # GPT-2 / nanoGPT


def _linear_of(module: nn.Module) -> Callable:
    """Linear with the enclosing module's config, mode and adapter dropout filled in."""
    return functools.partial(Linear, config=module.config, deterministic=module.deterministic,
                             adapter_dropout=module.adapter_dropout)


class Attention(nn.Module):
    config: GPTConfig
    deterministic: bool = True
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_BTD, positions_BT, layer, cache):
        c = self.config
        B, T, D = x_BTD.shape
        if c.norm_placement == "deepnorm":
            qkv_init = xavier_normal(1.0, 1.0, deepnorm_constants(c.n_layer)[1])
        else:
            qkv_init = _scaled_normal(c.init_std)
        linear = _linear_of(self)
        qkv = linear(3 * D, kernel_init=qkv_init, name="c_attn")(x_BTD)
        q_BTHD, k_BTHD, v_BTHD = (
            a.reshape(B, T, c.n_head, c.head_dim) for a in jnp.split(qkv, 3, axis=-1)
        )
        if c.pos_embedding == "rope":  # q and k only; keys are cached already rotated
            q_BTHD = pos_lib.apply_rope(q_BTHD, positions_BT, c.rope_base)
            k_BTHD = pos_lib.apply_rope(k_BTHD, positions_BT, c.rope_base)

        dropout_active = not self.deterministic and c.dropout > 0
        if cache is None and uses_dot_product_attention(c, dropout_active):
            out_BTHD = dot_product_attention(q_BTHD, k_BTHD, v_BTHD)
        elif cache is None:
            dropout = nn.Dropout(c.dropout, deterministic=False) if dropout_active else None
            out_BTHD = masked_attention(
                q_BTHD,
                k_BTHD.transpose(0, 2, 1, 3),
                v_BTHD.transpose(0, 2, 1, 3),
                causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), T),
                dropout,
            )
        else:
            cache = cache.write(layer, k_BTHD, v_BTHD)
            out_BTHD = cache.attend(layer, q_BTHD, positions_BT, k_BTHD, v_BTHD)
        y = linear(D, kernel_init=_residual_init(c), name="c_proj")(out_BTHD.reshape(B, T, D))
        return nn.Dropout(c.dropout, deterministic=self.deterministic)(y), cache


class MLP(nn.Module):
    config: GPTConfig
    deterministic: bool = True
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        c = self.config
        fc_init = (xavier_normal(deepnorm_constants(c.n_layer)[1])
                   if c.norm_placement == "deepnorm" else _scaled_normal(c.init_std))
        linear = _linear_of(self)
        h = linear(4 * c.n_embd, kernel_init=fc_init, name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's gelu_new (tanh approximation)
        y = linear(c.n_embd, kernel_init=_residual_init(c), name="c_proj")(h)
        return nn.Dropout(c.dropout, deterministic=self.deterministic)(y)


class Block(nn.Module):
    """One transformer layer: (x, cache) -> (x, cache); `layer` indexes the cache's buffers."""

    config: GPTConfig
    deterministic: bool = True
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, positions_BT, layer: int, cache):
        c = self.config
        attn = Attention(c, self.deterministic, self.adapter_dropout, name="attn")
        mlp = MLP(c, self.deterministic, self.adapter_dropout, name="mlp")
        ln_1, ln_2 = Norm(c, name="ln_1"), Norm(c, name="ln_2")
        if c.norm_placement == "pre":  # GPT-2: normalize each sublayer's input
            h, cache = attn(ln_1(x), positions_BT, layer, cache)
            x = x + h
            x = x + mlp(ln_2(x))
        elif c.norm_placement == "double":  # and its output, before the residual add
            h, cache = attn(ln_1(x), positions_BT, layer, cache)
            x = x + Norm(c, name="ln_1_out")(h)
            x = x + Norm(c, name="ln_2_out")(mlp(ln_2(x)))
        else:  # post-LN normalizes after each residual add; DeepNorm up-weights the residual
            alpha = deepnorm_constants(c.n_layer)[0] if c.norm_placement == "deepnorm" else 1.0
            h, cache = attn(x, positions_BT, layer, cache)
            x = ln_1(alpha * x + h)
            x = ln_2(alpha * x + mlp(x))
        return x, cache


class Layers(nn.Module):
    """The blocks, as Hugging Face names them: layer i is the submodule `h/i`.

    The one layer path of every mode (training, eval, prefill, decode): a Python loop over
    per-layer submodules, so every collection (params, lora, calibration, perturbations) and
    every dropout key reach a layer the same way (docs/design.md#1-one-param-form-per-layer)."""

    config: GPTConfig
    deterministic: bool = True
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, positions_BT, cache):
        for i in range(self.config.n_layer):
            x, cache = Block(self.config, self.deterministic, self.adapter_dropout, name=str(i))(
                x, positions_BT, i, cache)
        return x, cache


class GPT(nn.Module):
    """`hidden_only`: return ((final hidden states, head [V, D]), cache) instead of logits.
    `adapter_dropout`: LoRA's dropout on the adapters' inputs while training."""

    config: GPTConfig
    deterministic: bool = True
    hidden_only: bool = False
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, cache=None, logits_at_BK=None):
        c = self.config
        B, T = tokens_BT.shape
        if positions_BT is None:
            start = cache.lengths[:, None] if cache is not None else 0
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32)[None], (B, T))

        wte = Embed(c.vocab_size, c.n_embd, c, name="wte")
        x = wte(tokens_BT)
        if c.pos_embedding == "learned":
            x = x + Embed(c.block_size, c.n_embd, c, name="wpe")(positions_BT)
        elif c.pos_embedding == "sinusoidal":
            x = x * token_embedding_scale(c) + pos_lib.sinusoidal(positions_BT, c.n_embd).astype(
                c.dtype)
        # A no-op unless a 'perturbations' collection is passed: lets tests take
        # gradients with respect to the input embeddings (causality checks).
        x = self.perturb("embeddings", x)
        x = nn.Dropout(c.dropout, deterministic=self.deterministic)(x)

        x, cache = Layers(c, self.deterministic, self.adapter_dropout, name="h")(
            x, positions_BT, cache)

        if logits_at_BK is not None:  # decoding needs one position per row, not all T x V
            x = jnp.take_along_axis(x, logits_at_BK[:, :, None], axis=1)
        if c.norms_sublayer_inputs:  # post-LN and DeepNorm end on a norm already
            x = Norm(c, name="ln_f")(x)
        if cache is not None:
            cache = cache.advance(T)
        if c.tie_embeddings:
            head = wte.embedding
        else:
            head = param(self, "lm_head", nn.initializers.normal(c.init_std),
                         (c.n_embd, c.vocab_size), c.param_dtype)
        if self.hidden_only:  # the fused head cross-entropy (gpt2jax.loss) does the rest
            head_VD = weight(head).dequantize(c.dtype)
            return (x, head_VD if c.tie_embeddings else head_VD.T), cache
        # the tied head is wte [V, D], an untied one a kernel [D, V]
        logits = dense(x, head, c.dtype, transpose=c.tie_embeddings, out_dtype=jnp.float32)
        return logits.astype(jnp.float32), cache


# ---------------------------------------------------------------------------- public API


def init_params(config: GPTConfig, key: jax.Array) -> dict:
    """Fresh parameters (a plain nested dict) for `config`, from an explicit PRNG key."""
    tokens = jnp.zeros((1, min(config.block_size, 8)), jnp.int32)
    return _init(config, key, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _init(config, key, tokens):
    return GPT(config).init({"params": key}, tokens)["params"]


def check_tokens(tokens, config: GPTConfig, *, offset: int = 0) -> None:
    """Raise ValueError for ids outside [0, vocab_size) or sequences learned positions can't hold.

    Value checks run only on concrete arrays (inside a jit the values are unknown)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, time], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    T = tokens.shape[1]
    if config.pos_embedding == "learned" and offset + T > config.block_size:
        raise ValueError(
            f"sequence of {offset + T} positions exceeds block_size={config.block_size}, the "
            f"most learned positions (wpe) can encode: crop the input to {config.block_size} "
            f"tokens or use pos_embedding='rope'/'sinusoidal'"
        )
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    ids = np.asarray(tokens)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"token id {bad} is out of range [0, {config.vocab_size}) for vocab_size="
            f"{config.vocab_size}: check the tokenizer matches the model"
        )


def forward(
    params, tokens, config: GPTConfig, *, positions=None, cache=None, deterministic=True,
    rng=None, lora=None,
):
    """Logits float32 [B, T, vocab] and the updated cache (None in, None out).

    tokens: int [B, T]. positions: int [B, T], default 0..T-1 (or the cache's lengths + t).
    With dropout active (`deterministic=False` and config.dropout > 0, or adapters with
    dropout) pass `rng`."""
    tokens = jnp.asarray(tokens)
    check_tokens(tokens, config)
    dropout = config.dropout > 0 or (lora is not None and lora.config.dropout > 0)
    if not deterministic and dropout and rng is None:
        raise ValueError("forward(deterministic=False) with dropout > 0 (the model's or the "
                         "adapters') needs rng=<PRNG key>")
    if lora is not None:
        lora.check_compatible(config)
    return _forward(params, tokens, positions, cache, rng, lora, config, deterministic)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _forward(params, tokens, positions, cache, rng, lora, config, deterministic):
    return apply(params, tokens, config, positions=positions, cache=cache,
                 deterministic=deterministic, rng=rng, lora=lora)


def apply(params, tokens, config: GPTConfig, *, positions=None, cache=None,
          deterministic=True, rng=None, variables=None, logits_at=None, lora=None,
          hidden_only=False):
    """The unchecked forward, for use inside the caller's own jit (train step, decode loop).

    `variables` adds collections beside params (e.g. {'perturbations': ...}). `logits_at`
    int [B, K]: compute logits only at these time indices, giving [B, K, vocab].
    `lora`: `gpt2jax.lora.Adapters`, added to the frozen params (the trainable partition).
    `hidden_only`: return ((hidden [B, T, D] after the last norm, head [V, D]), cache) for
    `gpt2jax.loss.head_cross_entropy`."""
    rngs = {"dropout": rng} if rng is not None else {}
    variables = {"params": params, **(variables or {})}
    adapter_dropout = 0.0
    if lora is not None:
        variables["lora"] = lora.layer_tree()
        adapter_dropout = lora.config.dropout
    return GPT(config, deterministic, hidden_only, adapter_dropout).apply(
        variables, tokens, positions, cache, logits_at, rngs=rngs
    )


@functools.cache
def param_spec(config: GPTConfig) -> dict[str, params_lib.Leaf]:
    """Every param path of `config`'s tree -> its role, shape, module and layer
    (`gpt2jax.params`), from the shapes alone (nothing is allocated)."""
    return params_lib.describe(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))


def param_breakdown(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by what they do, from the param spec."""
    spec = param_spec(config).values()
    count = lambda keep: sum(int(np.prod(leaf.shape)) for leaf in spec if keep(leaf))
    counts = {
        "token_embedding": count(lambda leaf: leaf.module == "wte"),
        "position_embedding": count(lambda leaf: leaf.module == "wpe"),
        "attention": count(lambda leaf: leaf.module.startswith("attn.")),
        "mlp": count(lambda leaf: leaf.module.startswith("mlp.")),
        "norms": count(lambda leaf: leaf.role == "norm"),
        "lm_head": count(lambda leaf: leaf.role == "head"),
    }
    counts["per_block"] = count(lambda leaf: leaf.layer is not None) // config.n_layer
    counts["total"] = count(lambda leaf: True)
    embeddings = counts["token_embedding"] + counts["position_embedding"] + counts["lm_head"]
    counts["embedding_share_pct"] = 100.0 * embeddings / counts["total"]
    return counts
