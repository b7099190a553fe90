"""gpt2jax: GPT-2 in pure-functional JAX, with the argued-about design choices as switches.

`gpt2jax.generate` is the function; its module is `gpt2jax.generation`."""

from gpt2jax.cache import KVCache, init_cache
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate, generate_stream
from gpt2jax.model import apply, forward, init_params

__all__ = ["GPTConfig", "KVCache", "apply", "forward", "generate", "generate_stream",
           "init_cache", "init_params"]
