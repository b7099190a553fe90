"""The KV cache as a value: a pytree that goes into the forward and comes out updated.

Interface every cache kind implements (so attention never branches on the kind):

- `write(layer, k_BTHD, v_BTHD) -> cache`: store T new keys/values of every row at that
  row's own offset `lengths[b]` (keys arrive already rotated when RoPE is on); `layer` is a
  Python int: the model runs the layers one by one when it carries a cache;
- `attend(layer, q_BTHD, q_positions_BT, k_BTHD, v_BTHD) -> out_BTHD`: causal attention of
  the queries over everything cached for that layer (buffer index == absolute position),
  after `write` stored the chunk's k/v; a lossy cache attends to the chunk itself through
  the exact k_BTHD, v_BTHD;
- `advance(T) -> cache`: the rows' lengths grow by T once every layer has written;
- `nbytes`: the bytes its arrays hold.

Kinds: `KVCache` (float, `init_cache`) and `TurboQuantCache` (`init_turboquant_cache`: packed
TurboQuant codes, arXiv:2504.19874 Algorithms 1–2, plus an optional float window of the most
recent tokens); `make_cache` builds either from the `kv_cache` argument of `generate`.
`dense.py` and `turboquant.py` hold one kind each: a new kind is a new file with these four
members, and a branch in `make_cache`.

Memory: 2 (k and v) x n_layer x batch x max_len x n_embd x bytes per element for the float
cache; TurboQuant replaces the bytes per element by `turboquant.bits_per_value / 8`.
"""

from __future__ import annotations

import jax.numpy as jnp

from gpt2jax.cache.dense import KVCache, init_cache
from gpt2jax.cache.turboquant import (
    TurboQuantCache,
    check_turboquant,
    init_turboquant_cache,
    turboquant_quantizers,
)
from gpt2jax.config import GPTConfig
from gpt2jax.quant.turboquant import TurboQuantConfig

CACHE_DTYPES = ("float32", "bfloat16", "float16")

__all__ = ["CACHE_DTYPES", "KVCache", "TurboQuantCache", "check_cache_kind", "init_cache",
           "init_turboquant_cache", "make_cache", "turboquant_quantizers"]


def check_cache_kind(kind, config: GPTConfig) -> None:
    """Raise a ValueError naming the fix unless `make_cache` accepts kind for config."""
    if isinstance(kind, TurboQuantConfig):
        check_turboquant(kind, config.head_dim)
    elif kind is not None and kind not in CACHE_DTYPES:
        raise ValueError(
            f"kv_cache={kind!r} is invalid: use None (float in the model's dtype), one of "
            f"{CACHE_DTYPES}, or TurboQuantConfig(bits=...)")


def make_cache(config: GPTConfig, batch: int, max_len: int, kind=None):
    """kind None: `KVCache` in config.dtype; a name of CACHE_DTYPES: `KVCache` in it; a
    TurboQuantConfig: `TurboQuantCache` (window in config.dtype)."""
    check_cache_kind(kind, config)
    if isinstance(kind, TurboQuantConfig):
        return init_turboquant_cache(config, batch, max_len, kind, jnp.dtype(config.dtype))
    return init_cache(config, batch, max_len, jnp.dtype(kind or config.dtype))
