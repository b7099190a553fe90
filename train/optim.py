"""AdamW, or Muon for the blocks' kernels beside AdamW for the rest, with global-norm
clipping and masked weight decay; the warmup + cosine schedule.

The optimizer returns the update direction for a learning rate of 1; the train step
multiplies it by the step's learning rate, which the host passes in. That is optax.adamw
(scale_by_adam -> add_decayed_weights -> scale by -lr) with the last factor moved out, so
the schedule may follow wall-clock time as well as steps (`--max-minutes`) without a
recompile or a learning rate baked into the optimizer state. Muon's own learning rate is
the ratio muon_lr / lr inside its branch, so both follow the one schedule's shape
(docs/design.md#muon).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax
import optax.contrib

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


OPTIMIZERS = ("adamw", "muon")


def muon_labels(tree) -> dict:
    """'muon' for the blocks' Linear kernels (the param spec's 2-D hidden matrices), 'adamw'
    for everything else: embeddings, the head (tied or untied), biases, norm gains, and
    LoRA's factors (orthogonalizing a rank-r factor sets all its singular values alike,
    erasing the scale that alpha/r or alpha/sqrt(r) is there to set)."""

    def label(path, _):
        if params_lib.keys(path)[-1] in lora.FACTOR_NAMES:
            return "adamw"
        return "muon" if params_lib.role(path) == "kernel" else "adamw"

    return jax.tree_util.tree_map_with_path(label, tree)


def check_optimizer(optimizer: str, lr: float, muon_lr: float, muon_momentum: float) -> None:
    """ValueError naming the value and the fix for settings no optimizer here can run."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}: pass "
                         f"--optimizer adamw or --optimizer muon")
    if not lr > 0:
        raise ValueError(f"lr={lr} must be > 0: pass --lr with a positive learning rate")
    if optimizer == "muon":
        if not muon_lr > 0:
            raise ValueError(f"muon_lr={muon_lr} must be > 0: pass --muon-lr with a positive "
                             f"learning rate (default 0.02)")
        if not 0 <= muon_momentum < 1:
            raise ValueError(f"muon_momentum={muon_momentum} must be in [0, 1): pass "
                             f"--muon-momentum 0.95 (the default) or another value below 1")


def make_optimizer(*, weight_decay: float, beta1: float = 0.9, beta2: float = 0.95,
                   grad_clip: float = 1.0, optimizer: str = "adamw", lr: float = 1.0,
                   muon_lr: float = 0.02, muon_momentum: float = 0.95,
                   ) -> optax.GradientTransformation:
    """Clip -> Adam -> decoupled weight decay: the direction that -lr scales.

    optimizer="muon": the kernels `muon_labels` names take optax's Muon (Nesterov momentum
    `muon_momentum`, Newton-Schulz orthogonalization, its width scaling, decoupled decay at
    its own rate), scaled by muon_lr / lr so that the host's lr_t gives muon_lr_t; the
    rest take the AdamW above."""
    check_optimizer(optimizer, lr, muon_lr, muon_momentum)
    clip = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    adamw = [optax.scale_by_adam(b1=beta1, b2=beta2),
             optax.add_decayed_weights(weight_decay, mask=decay_mask)]
    if optimizer == "adamw":
        return optax.chain(*clip, *adamw)
    # optax's Muon ends in -learning_rate; the step subtracts, so its sign flips back
    muon = optax.chain(optax.contrib.muon(muon_lr / lr, beta=muon_momentum,
                                          weight_decay=weight_decay), optax.scale(-1.0))
    return optax.chain(*clip, optax.partition({"adamw": optax.chain(*adamw), "muon": muon},
                                              muon_labels))


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


def optimizer_for(cfg) -> optax.GradientTransformation:
    """The optimizer a TrainConfig names."""
    return make_optimizer(weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                          grad_clip=cfg.grad_clip, optimizer=cfg.optimizer, lr=cfg.lr,
                          muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum)
