"""Serving: the slot engine (`engine.py`) and its OpenAI-compatible HTTP API (`api.py`);
`python -m gpt2jax.serve --ckpt DIR` runs both."""

from gpt2jax.serve.engine import Engine, QueueFull, Request, Sampling, cache_bytes

__all__ = ["Engine", "QueueFull", "Request", "Sampling", "cache_bytes"]
