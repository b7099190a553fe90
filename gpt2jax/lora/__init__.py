"""LoRA and rsLoRA: adapters as their own pytree, the trainable partition over a frozen base
(`adapters.py`: config, init, the model's per-layer view, merge), and peft interop
(`peft.py`)."""

from gpt2jax.lora.adapters import (
    FACTOR_NAMES,
    TARGETS,
    Adapters,
    LoRAConfig,
    count,
    delta_norm,
    init,
    merge,
    unmerge,
)
from gpt2jax.lora.peft import load_peft, save_peft, to_peft

__all__ = ["FACTOR_NAMES", "TARGETS", "Adapters", "LoRAConfig", "count", "delta_norm", "init",
           "load_peft", "merge", "save_peft", "to_peft", "unmerge"]
