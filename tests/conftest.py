"""Test-session settings shared by every test file."""

from __future__ import annotations

import os
from pathlib import Path

# The suite compiles hundreds of tiny programs and runs each a few times: compile time
# dominates, and XLA's backend optimizations roughly double it (measured: 4.2 s -> 2.2 s per
# model variant). Benchmarks under eval/ keep the default optimization level.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GPT2JAX_DATA_DIR", REPO.parent / "shared" / "data"))
