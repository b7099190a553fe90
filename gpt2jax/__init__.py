"""gpt2jax: GPT-2 in pure-functional JAX, with the argued-about design choices as switches.

`gpt2jax.generate` is the function: it takes its module's name on the package, while
`from gpt2jax.generate import ...` still reads the module (which stays in sys.modules;
`importlib.import_module("gpt2jax.generate")` gives the module object itself)."""

from gpt2jax.config import GPTConfig
from gpt2jax.generate import generate, generate_stream
from gpt2jax.kvcache import KVCache, init_cache
from gpt2jax.model import apply, forward, init_params

__all__ = ["GPTConfig", "KVCache", "apply", "forward", "generate", "generate_stream",
           "init_cache", "init_params"]
