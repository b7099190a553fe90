"""Training for gpt2jax: data preparation, the optax train step, the loop, presets.

    python -m train.prepare --data shakespeare --out data/shakespeare
    python -m train --preset shakespeare

Eval programs call `train(TrainConfig(...))` directly (`Trainer(cfg).run()`: setup, step,
evaluate, save, finish); the CLIs only parse arguments.
"""

from train.config import PRESETS, TrainConfig, preset
from train.trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["PRESETS", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "preset",
           "train"]
