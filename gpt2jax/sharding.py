"""The device mesh and the named shardings of train state and batches.

One mesh axis, 'data'. Batches are split over it (data parallel). Params and optimizer state
are either replicated (`fsdp=False`) or each array is split over 'data' along its largest
dimension that divides evenly (`fsdp=True`, ZeRO-3 style); XLA's SPMD partitioner inserts
the all-gathers and reduce-scatters. The rule depends on the shape alone, so Adam's mu/nu
land exactly where their param does.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
# Environment variables that mean "this process is one of several" to jax.distributed's
# cluster auto-detection (explicit coordinator, SLURM, Open MPI, Cloud TPU pods).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                      "TPU_WORKER_HOSTNAMES")


def launched_multi_process() -> bool:
    for name in _MULTI_PROCESS_ENV:
        value = os.environ.get(name, "")
        if name == "JAX_COORDINATOR_ADDRESS" and value:
            return True
        if (value.isdigit() and int(value) > 1) or "," in value:
            return True
    return False


def initialize_distributed() -> None:
    """jax.distributed.initialize() when launched as several processes, else nothing.

    Must run before anything touches a device; the cluster (coordinator, process id,
    process count) is detected from the environment by JAX itself."""
    if launched_multi_process() and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(data: int | None = None) -> Mesh:
    """A 1-D mesh ('data',) over the first `data` devices (all devices when None)."""
    devices = jax.devices()
    n = len(devices) if data is None else data
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"--mesh data={n} needs {n} devices but {len(devices)} are visible "
            f"({devices[0].platform}); on CPU, simulate more with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    return Mesh(np.asarray(devices[:n]), (DATA,))


def parse_mesh(spec: str) -> int:
    """'data=4' -> 4 (the only axis this trainer shards over)."""
    name, _, value = spec.partition("=")
    if name.strip() != DATA or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"--mesh {spec!r} is not understood: write --mesh data=N with N >= 1")
    return int(value)


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest dimension divisible by n over 'data'; replicate if none is."""
    if n > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                return P(*([None] * dim + [DATA]))
    return P()


def state_shardings(tree, mesh: Mesh, fsdp: bool):
    """NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    n = mesh.shape[DATA]

    def sharding(leaf):
        spec = fsdp_spec(tuple(leaf.shape), n) if fsdp else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split axis `batch_axis` of an ndim-array over 'data' (e.g. [K, B, T]: batch_axis=1)."""
    spec = [None] * ndim
    spec[batch_axis] = DATA
    return NamedSharding(mesh, P(*spec))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full (the batch sampler
    draws the same global batch everywhere); each process uploads only its own shards."""
    if array.shape[_batch_dim(sharding)] % sharding.mesh.shape[DATA]:
        raise ValueError(
            f"batch of {array.shape[_batch_dim(sharding)]} rows does not split over "
            f"{sharding.mesh.shape[DATA]} devices: make --batch-size a multiple of it"
        )
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _batch_dim(sharding: NamedSharding) -> int:
    return list(sharding.spec).index(DATA)
