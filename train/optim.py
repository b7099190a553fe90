"""AdamW with global-norm clipping and masked weight decay; the warmup + cosine schedule.

The optimizer returns the update direction for a learning rate of 1; the train step
multiplies it by the step's learning rate, which the host passes in. That is optax.adamw
(scale_by_adam -> add_decayed_weights -> scale by -lr) with the last factor moved out, so
the schedule may follow wall-clock time as well as steps (`--max-minutes`) without a
recompile or a learning rate baked into the optimizer state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from gpt2jax import lora
from gpt2jax import params as params_lib


def decay_mask(tree) -> dict:
    """True where weight decay applies: the param spec's matrices (kernels, embeddings, an
    untied head) and LoRA's factors (decay pulls an adapter toward the base); False for norm
    gains and biases and for Linear biases. Decaying a norm gain pulls it toward 0, which
    shrinks the signal rather than regularizing a function; biases are too few to overfit
    with and GPT-2/nanoGPT leave them out too."""

    def is_decayed(path, _):
        if params_lib.keys(path)[-1] in lora.FACTOR_NAMES:  # an adapter tree's A or B
            return True
        return params_lib.role(path) in ("kernel", "embedding", "head")

    return jax.tree_util.tree_map_with_path(is_decayed, tree)


def make_optimizer(*, weight_decay: float, beta1: float = 0.9, beta2: float = 0.95,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
    """Clip -> Adam -> decoupled weight decay: the direction that -lr scales."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts += [optax.scale_by_adam(b1=beta1, b2=beta2),
              optax.add_decayed_weights(weight_decay, mask=decay_mask)]
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """0 -> lr linearly over warmup_steps, then cosine down to min_lr.

    Progress through the cosine is the further along of steps (step / max_steps) and, when
    the run has a time budget, wall-clock time (`time_fraction`, 0..1 of the budget left
    after warmup): a run ends annealed whichever budget runs out first."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def __post_init__(self):
        if self.max_steps <= self.warmup_steps:
            raise ValueError(
                f"max_steps={self.max_steps} must exceed warmup_steps={self.warmup_steps}: "
                f"raise --max-steps or lower --warmup-steps"
            )

    def progress(self, step: int, time_fraction: float = 0.0) -> float:
        by_steps = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return min(max(by_steps, time_fraction, 0.0), 1.0)

    def __call__(self, step: int, time_fraction: float = 0.0) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress(step, time_fraction)))
        return self.min_lr + (self.lr - self.min_lr) * cosine
