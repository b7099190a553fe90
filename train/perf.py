"""FLOP counts and the measured peak that MFU is reported against."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gpt2jax.config import GPTConfig


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention.

    Matmul weights: 12 D^2 per layer (c_attn 3D^2, c_proj D^2, MLP 8D^2) and the V x D
    output head (tied or not; the embedding lookup itself is free). Attention scores and
    the weighted sum add 12 L T D (PaLM's appendix B count, no causal discount)."""
    T = seq_len or config.block_size
    L, D, V = config.n_layer, config.n_embd, config.vocab_size
    return 6.0 * (12 * L * D * D + V * D) + 12.0 * L * T * D


def sustained_flops(matmul, n: int, loops: int = 7, per_loop: int = 4) -> float:
    """Median over `loops` of the FLOP/s of `per_loop` back-to-back n x n x n `matmul()` calls
    (blocking). A median of sustained loops, not the best single call: on a shared machine the
    best call is an outlier and the first calls run before the clock has ramped up."""
    matmul()
    rates = []
    for _ in range(loops):
        t = time.perf_counter()
        for _ in range(per_loop):
            matmul()
        rates.append(per_loop * 2.0 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def measure_peak_flops(dtype: str = "float32", n: int = 2048) -> float:
    """FLOP/s of one device on an n x n matmul in `dtype` (a few seconds): the MFU
    denominator when the user gives none — what XLA's own matmul reaches on this machine,
    not a datasheet number."""
    a = jnp.ones((n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x, y: x @ y)
    return sustained_flops(lambda: matmul(a, a).block_until_ready(), n)


def cores() -> int:
    """The cores this process may run on (not the machine's count: containers pin)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS has no affinity call


def cpu_model() -> str:
    """lscpu's model name: ratios against PyTorch follow the host (docs/design.md)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():  # not Linux
        return platform.processor() or platform.machine() or "unknown CPU"
    info = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    name = info.get("model name", "unknown CPU")
    # a bare "AMD EPYC" names no generation: family 25 is Zen 3/4, 26 Zen 5
    return f"{name} (family {info['cpu family']}, model {info['model']})" \
        if "cpu family" in info and "model" in info else name


def machine() -> dict:
    """What a figure was measured on: CPU model, usable cores, scheduling policy."""
    if not hasattr(os, "sched_getscheduler"):
        return {"cpu": cpu_model(), "cores": cores()}
    policy = os.sched_getscheduler(0)
    names = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR"}
    return {"cpu": cpu_model(), "cores": cores(), "sched": names.get(policy, str(policy))}
