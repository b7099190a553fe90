"""`GPTConfig`: every design switch of the model in one frozen, hashable dataclass.

Hashable so it can be a static argument of `jax.jit`; frozen so a config that was
validated stays valid.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

POS_EMBEDDINGS = ("learned", "sinusoidal", "rope")
NORM_PLACEMENTS = ("pre", "post", "deepnorm", "double")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16", "float16")
# masked: the einsum + masked softmax of attention.masked_attention (CPU-tuned, dropout-capable);
# dot_product_attention: jax.nn.dot_product_attention (cuDNN's fused kernel on a GPU in
# bfloat16/float16, XLA's elsewhere); auto: the latter where cuDNN's kernel applies, else masked.
ATTENTION_IMPLS = ("auto", "masked", "dot_product_attention")

# name -> (n_layer, n_head, n_embd); all GPT-2 sizes have 64-dim heads.
_GPT2_SHAPES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters and the design switches the project measures.

    The defaults are GPT-2 (124M): learned positions, pre-LN LayerNorm, tied embeddings.
    """

    vocab_size: int = 50257
    block_size: int = 1024  # context length; a hard limit only for learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2: True)
    pos_embedding: str = "learned"  # learned (wpe) | sinusoidal | rope
    # pre (GPT-2) | post (Vaswani) | deepnorm (Wang et al. 2022) | double (a norm on each
    # sublayer's input and output: Sandwich-LN, Peri-LN)
    norm_placement: str = "pre"
    norm: str = "layernorm"  # layernorm | rmsnorm
    tie_embeddings: bool = True  # lm_head shares wte
    rope_base: float = 10000.0
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # compute dtype of matmuls
    param_dtype: str = "float32"
    init_std: float = 0.02
    attention_impl: str = "auto"  # auto | masked | dot_product_attention (ATTENTION_IMPLS)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> GPTConfig:
        """Raise `ValueError` naming the field, the value and what is allowed."""

        def bad(field: str, allowed: str):
            value = getattr(self, field)
            raise ValueError(f"GPTConfig.{field}={value!r} is invalid: {allowed}")

        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(field, "must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"choose n_head among the divisors of n_embd "
                f"(e.g. {[h for h in range(1, 33) if self.n_embd % h == 0][-3:]})"
            )
        choices = {
            "pos_embedding": POS_EMBEDDINGS,
            "norm_placement": NORM_PLACEMENTS,
            "norm": NORMS,
            "dtype": DTYPES,
            "param_dtype": DTYPES,
            "attention_impl": ATTENTION_IMPLS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                bad(field, f"allowed values are {', '.join(map(repr, allowed))}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"GPTConfig.pos_embedding='rope' needs an even head dim, but "
                f"n_embd={self.n_embd} / n_head={self.n_head} = {self.head_dim}: "
                f"change n_head so that n_embd / n_head is even"
            )
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if self.attention_impl == "dot_product_attention" and self.dropout > 0:
            raise ValueError(
                f"GPTConfig.attention_impl='dot_product_attention' cannot drop attention "
                f"probabilities, but dropout={self.dropout}: set dropout=0, or attention_impl="
                f"'auto' (masked attention while dropout is active) or 'masked'"
            )
        if not self.layer_norm_epsilon > 0:
            bad("layer_norm_epsilon", "must be > 0")
        if not self.rope_base > 1:
            bad("rope_base", "must be > 1")
        if not self.init_std > 0:
            bad("init_std", "must be > 0")
        return self

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def norms_sublayer_inputs(self) -> bool:
        """True where each sublayer reads Norm(x) from the residual stream (pre-LN, Double
        Norm), so the stream itself is never normalized and `ln_f` ends the blocks."""
        return self.norm_placement in ("pre", "double")

    @property
    def gpt2_compatible(self) -> bool:
        """True when Hugging Face's GPT2LMHeadModel can hold this architecture."""
        return (
            self.pos_embedding == "learned"
            and self.norm_placement == "pre"
            and self.norm == "layernorm"
            and self.bias
        )

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (exact GPT-2 shapes) or `baby`."""
        if name in _GPT2_SHAPES:
            n_layer, n_head, n_embd = _GPT2_SHAPES[name]
            base = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        elif name == "baby":  # nanoGPT's shakespeare size, on GPT-2 BPE; fits a CPU
            base = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
        else:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**base, **overrides})

    @classmethod
    def gpt2(cls, **overrides: Any) -> GPTConfig:
        return cls.preset("gpt2", **overrides)


PRESETS = (*_GPT2_SHAPES, "baby")
