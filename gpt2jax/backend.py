"""The one switch for layouts that only XLA:CPU wants (docs/design.md#layouts-for-every-backend).

Every public shape is the same on every backend (kernels [in, out], caches [B, H, S, D]);
behind `cpu_layouts()` the library picks, on CPU only:

- int8 kernels of W8A8 stored [out, in]: XLA:CPU's int8 dot reads that layout fastest;
- one activation row padded to two before an int8 dot: its single-row path is 5x slower
  (768x2304: 491 µs for one row, 96 µs for two).

Elsewhere (GPU, TPU) the plain layouts are used, which the compilers there tile themselves.
"""

from __future__ import annotations

import jax


def cpu_layouts() -> bool:
    """Whether the CPU-only layouts above are in force: on the CPU backend."""
    return jax.default_backend() == "cpu"
