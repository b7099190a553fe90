"""LoRA and rsLoRA adapters as their own pytree: the trainable partition over a frozen base.

An adapter on a Linear with kernel K (in, out) adds `s · (x A) B`, A (in, r), B (r, out),
s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA). A starts uniform in ±1/sqrt(in) (as
peft / loralib: a rank-independent distribution, which rsLoRA's argument needs), B at zero,
so the adapted model starts equal to the base.

The adapter tree mirrors the param paths with the layers stacked on a leading axis (the
adapters are small, and merging or exporting them is one einsum over the layers):
`h/attn/c_attn/{a [L, D, r], b [L, r, 3D]}`; the model reads it per layer, `h/i/attn/...`
(`Adapters.layer_tree`), as it reads its params. The q/v-only target of the LoRA paper holds two
adapters on the fused qkv kernel, `h/attn/c_attn/{q_a, q_b, v_a, v_b}`, writing only the q
and v thirds of its output.
"""

from gpt2jax.lora.adapters import (
    FACTOR_NAMES,
    TARGETS,
    Adapters,
    LoRAConfig,
    add_adapter_outputs,
    check_compatible,
    count,
    delta_norm,
    init,
    merge,
    unmerge,
)
from gpt2jax.lora.peft import load_peft, save_peft, to_peft

__all__ = ["FACTOR_NAMES", "TARGETS", "Adapters", "LoRAConfig", "add_adapter_outputs",
           "check_compatible", "count", "delta_norm", "init", "load_peft", "merge", "save_peft",
           "to_peft", "unmerge"]
