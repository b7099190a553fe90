"""The loss, the jitted train step and the eval step, as pure functions of a state pytree.

State (a plain dict, so orbax saves it as is and sharding rules see plain paths):

    step       int32 []        optimizer steps taken
    params     the trainable tree: the model's params, or with LoRA the adapters' tree
               (then the frozen base is a separate argument of every step, never in
               the state, so it gets no gradient, no optimizer state and no update)
    opt_state  optax state of `optimizer`
    rng        uint32 [2]      base PRNG key; step s uses fold_in(rng, s), so dropout masks
                               depend only on (seed, step) and resume replays them exactly
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gpt2jax import loss as loss_lib
from gpt2jax import model
from gpt2jax.config import GPTConfig
from gpt2jax.lora import Adapters, LoRAConfig


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.key_data(jax.random.PRNGKey(seed)),
    }


def token_losses(params, x_BT, y_BT, config: GPTConfig, *, rng=None, lora=None):
    """Cross-entropy float32 [B, T] of predicting y from x (dropout on when rng is given)."""
    logits_BTV, _ = model.apply(
        params, x_BT, config, deterministic=rng is None, rng=rng, lora=lora
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT)


def _model_inputs(trainable, base, config: GPTConfig, lora_config: LoRAConfig | None):
    """(params, lora) for the model: the trainable tree is the params, or the adapters."""
    if lora_config is None:
        return trainable, None
    return base, Adapters(tree=trainable, config=lora_config, base=config)


def make_train_step(config: GPTConfig, optimizer: optax.GradientTransformation,
                    lora_config: LoRAConfig | None = None):
    """step(state, x_KBT, y_KBT, lr[, base]) -> (state, metrics): K micro-batches of [B, T],
    one update of size lr (a float32 scalar from the host's schedule, so it never recompiles).
    With lora_config, `base` is the frozen model under the adapters in state["params"].

    Gradients of the K micro-batches are averaged inside one jitted call (lax.scan), so
    accumulation costs no host round trips and the update equals one batch of K*B rows."""
    dropout = config.dropout > 0 or (lora_config is not None and lora_config.dropout > 0)

    def micro_loss(trainable, base, x_BT, y_BT, rng):
        params, lora = _model_inputs(trainable, base, config, lora_config)
        (h_BTD, head_VD), _ = model.apply(
            params, x_BT, config, deterministic=not dropout, rng=rng if dropout else None,
            lora=lora, hidden_only=True)
        return loss_lib.head_cross_entropy(h_BTD.reshape(-1, h_BTD.shape[-1]), head_VD,
                                           y_BT.reshape(-1))

    grad_fn = jax.value_and_grad(micro_loss)  # w.r.t. the trainable tree only

    def step(state, x_KBT, y_KBT, lr, base=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        K = x_KBT.shape[0]

        def accumulate(carry, inputs):
            k, x_BT, y_BT = inputs
            loss, grads = grad_fn(state["params"], base, x_BT, y_BT, jax.random.fold_in(key, k))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        if K == 1:
            total, _ = accumulate(zeros, (0, x_KBT[0], y_KBT[0]))
        else:
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(K), x_KBT, y_KBT))
        loss, grads = jax.tree.map(lambda a: a / K, total)
        direction, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), state["params"],
                                   direction),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        metrics = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
        return new_state, metrics

    return step


def make_eval_step(config: GPTConfig, lora_config: LoRAConfig | None = None):
    """eval(trainable, x_BT, y_BT, w_B[, base]) -> (sum of w * row-mean loss, sum of w)."""

    def evaluate(trainable, x_BT, y_BT, w_B, base=None):
        params, lora = _model_inputs(trainable, base, config, lora_config)
        row_loss_B = token_losses(params, x_BT, y_BT, config, lora=lora).mean(-1)
        return (row_loss_B * w_B).sum(), w_B.sum()

    return evaluate
