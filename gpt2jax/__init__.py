"""gpt2jax: GPT-2 in pure-functional JAX, with the argued-about design choices as switches."""

from gpt2jax.config import GPTConfig
from gpt2jax.kvcache import KVCache, init_cache
from gpt2jax.model import apply, forward, init_params

__all__ = ["GPTConfig", "KVCache", "apply", "forward", "init_cache", "init_params"]
