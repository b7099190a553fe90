"""The param spec: what every leaf of a param tree is, decided in one place.

Each path of the tree has a role:

    embedding   a lookup table: `wte`, `wpe`
    kernel      a Linear's weight (in, out): `h/i/attn/c_attn/kernel`, ...
    bias        a Linear's bias
    norm        a norm's gain or bias: `h/i/ln_1/scale`, `ln_f/bias`, ...
    head        an untied output head [D, V]: `lm_head`

`role(path)` is the rule; `gpt2jax.model.param_spec(config)` applies it to the shapes of a
config's tree (path -> role, shape, module, layer), and a test checks the rule against the
Flax module class that creates each leaf. The HF loader, LoRA's targets, the int8 skip rule,
the weight-decay mask and `param_breakdown` all ask it instead of matching names themselves.
"""

from __future__ import annotations

import dataclasses

import jax

ROLES = ("embedding", "kernel", "bias", "norm", "head")
NORM_MODULES = ("ln_1", "ln_2", "ln_1_out", "ln_2_out", "ln_f")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of the spec: its role, shape, the module that owns it ("attn.c_attn",
    "ln_1", "wte", ...) and its layer (None outside the blocks)."""

    role: str
    shape: tuple[int, ...]
    module: str
    layer: int | None


def keys(path) -> tuple[str, ...]:
    """A jax key path (or a tuple of names) as plain strings: ('h', '0', 'attn', ...)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def role(path) -> str:
    """The role of the leaf at `path`; ValueError for a path that is not a param of GPT."""
    names = keys(path)
    if names == ("lm_head",):
        return "head"
    if len(names) >= 2 and names[-1] == "embedding" and names[0] in ("wte", "wpe"):
        return "embedding"
    if len(names) >= 2 and names[-2] in NORM_MODULES and names[-1] in ("scale", "bias"):
        return "norm"
    if len(names) >= 3 and names[-1] in ("kernel", "bias") and names[-3] in ("attn", "mlp"):
        return names[-1]
    raise ValueError(f"{'/'.join(names)} is not a GPT param path (roles: {', '.join(ROLES)})")


def module(path) -> str:
    """The module a leaf belongs to, without the layer: 'attn.c_attn', 'ln_2', 'wte'."""
    names = keys(path)
    inner = names[2:] if names[0] == "h" else names
    return ".".join(inner[:-1]) or inner[0]


def layer(path) -> int | None:
    names = keys(path)
    return int(names[1]) if names[0] == "h" else None


def describe(tree) -> dict[str, Leaf]:
    """{'h/0/attn/c_attn/kernel': Leaf(...), ...} for a param tree (arrays or shapes)."""
    return {"/".join(keys(path)): Leaf(role(path), tuple(leaf.shape), module(path), layer(path))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def roles(tree):
    """The tree with each leaf replaced by its role (a weight-decay mask is one map away)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: role(path), tree)
