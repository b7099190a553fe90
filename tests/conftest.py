"""Test-session settings shared by every test file."""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA knows `flag` (an unknown flag aborts the process)."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env={**os.environ, "XLA_FLAGS": flag}, capture_output=True)
    return probe.returncode == 0


# The suite compiles hundreds of tiny programs and runs each a few times: compile time
# dominates, and XLA's backend optimizations roughly double it (measured: 4.2 s -> 2.2 s per
# model variant). Without XLA:CPU's newer fusion emitters a compile at -O0 takes about half
# as long again (`python -m eval.profile_compile`): the legacy emitters are used while this
# XLA still has them. Set once here, so xdist workers and child processes inherit it; the copy in
# GPT2JAX_TEST_XLA_FLAGS says the suite set it (`python -m eval.profile_compile` times these
# flag sets). Benchmarks under eval/ keep XLA's defaults.
if "XLA_FLAGS" not in os.environ:
    _flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    _legacy_emitters = "--xla_cpu_use_fusion_emitters=false"
    os.environ["GPT2JAX_TEST_XLA_FLAGS"] = os.environ["XLA_FLAGS"] = _flags + (
        f" {_legacy_emitters}" if _xla_accepts(_legacy_emitters) else "")
SUITE_XLA_FLAGS = os.environ.get("GPT2JAX_TEST_XLA_FLAGS")

# Tests compile the same programs again and again (a tiny model trained by several tests, a
# child process running what its parent ran, two xdist workers): XLA's persistent cache,
# in a folder new to this session and shared by its processes (workers and children
# inherit the variable), compiles each once. Measured: tests/test_train.py 109 -> 78 s CPU.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="gpt2jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GPT2JAX_DATA_DIR", REPO.parent / "shared" / "data"))
# Exported, so that every child process (experiments run as `python -m eval...`, trainers in
# subprocesses) finds the corpus here too instead of trying to download it.
os.environ["GPT2JAX_DATA_DIR"] = str(DATA_DIR)
# Test weights are made locally: no test may reach a model hub, in this process or a child.
for _offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_offline, "1")


def require(module: str):
    """`pytest.importorskip(module)`, except under GPT2JAX_REQUIRE_REFERENCES=1 (set by
    .ci/run): there a missing reference library (torch, transformers, peft) fails the run, so
    a CI without them cannot pass by skipping every parity test."""
    if os.environ.get("GPT2JAX_REQUIRE_REFERENCES") == "1":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is required for the parity tests under "
                        f"GPT2JAX_REQUIRE_REFERENCES=1 ({e}); pip install -e '.[dev]'",
                        pytrace=False)
    return pytest.importorskip(module)


@pytest.fixture
def apply_traces(monkeypatch):
    """A list that grows by one whenever generation traces the model (`apply` called while
    jax traces `gpt2jax.generate`'s functions): a compile counter."""
    from gpt2jax import generation as module
    traces = []
    real_apply = module.apply
    monkeypatch.setattr(module, "apply", lambda *a, **kw: traces.append(1) or real_apply(*a, **kw))
    return traces
