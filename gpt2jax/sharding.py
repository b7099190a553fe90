"""The device mesh, the named shardings of train state and batches, and the processes.

One mesh axis, 'data'. Batches are split over it (data parallel). Params and optimizer state
are either replicated (`fsdp=False`) or each array is split over 'data' along its largest
dimension that divides evenly (`fsdp=True`, ZeRO-3 style); XLA's SPMD partitioner inserts
the all-gathers and reduce-scatters. The rule depends on the shape alone, so Adam's mu/nu
land exactly where their param does.

Several processes (hosts) run the same program over one global mesh (`jax.distributed`):
each feeds only its own block of every batch (`process_rows`).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
# Environment variables that mean "this process is one of several" to jax.distributed's
# cluster auto-detection (explicit coordinator, SLURM, Open MPI, TPU pods on GKE).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                      "TPU_WORKER_HOSTNAMES")
# GPT2JAX_DISTRIBUTED=1: initialize anyway, for clusters JAX finds without environment
# variables (a TPU pod's VMs announce themselves through their metadata server).
DISTRIBUTED_ENV = "GPT2JAX_DISTRIBUTED"
# How `python -m train.launch` numbers its processes (beside JAX's own JAX_COORDINATOR_ADDRESS);
# the clusters above are numbered by jax.distributed itself.
NUM_PROCESSES_ENV = "GPT2JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "GPT2JAX_PROCESS_ID"
# A process that misses heartbeats this long is declared dead and JAX terminates the others
# (its default is 100 s). Survivors of a SIGKILLed peer stop ~0.8x this later
# (docs/design.md#multi-process).
HEARTBEAT_TIMEOUT_S = 30


def launched_multi_process() -> bool:
    if os.environ.get(DISTRIBUTED_ENV) == "1":
        return True
    for name in _MULTI_PROCESS_ENV:
        value = os.environ.get(name, "")
        if name == "JAX_COORDINATOR_ADDRESS" and value:
            return True
        if (value.isdigit() and int(value) > 1) or "," in value:
            return True
    return False


def initialize_distributed() -> None:
    """jax.distributed.initialize() when launched as several processes, else nothing.

    Must run before anything touches a device. The cluster (coordinator, process id, process
    count) comes from `train.launch`'s variables above, or JAX detects it by itself."""
    if launched_multi_process() and not jax.distributed.is_initialized():
        count, index = os.environ.get(NUM_PROCESSES_ENV), os.environ.get(PROCESS_ID_ENV)
        jax.distributed.initialize(
            num_processes=int(count) if count else None,
            process_id=int(index) if index else None,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )


def exit_at_once(code: int):
    """End this process now, skipping jax.distributed's shutdown barrier: a process that failed
    would wait there (5 min by default) for peers that are themselves blocked waiting for it
    in a collective. Its peers then stop on the missed heartbeats, or by the launcher."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_mesh(data: int | None = None) -> Mesh:
    """A 1-D mesh ('data',) over the first `data` devices (all devices when None), ordered by
    process so that each process's devices hold one contiguous block of every batch."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = len(devices) if data is None else data
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"--mesh data={n} needs {n} devices but {len(devices)} are visible "
            f"({devices[0].platform}); on CPU, simulate more with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(
            f"--mesh data={n} leaves out devices of a {jax.process_count()}-process run: every "
            f"process must hold part of the mesh; use --mesh data={len(devices)}"
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


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The block of the batch axis this process's devices hold: the rows it reads and passes
    to `jax.make_array_from_process_local_data(sharding, rows, global_shape)`."""
    dim = _batch_dim(sharding)
    n = global_shape[dim]
    if n % sharding.mesh.shape[DATA]:
        raise ValueError(
            f"batch of {n} rows does not split over {sharding.mesh.shape[DATA]} devices: make "
            f"--batch-size a multiple of it"
        )
    blocks = sorted(index[dim].indices(n)[:2]
                    for index in sharding.addressable_devices_indices_map(global_shape).values())
    return slice(blocks[0][0], blocks[-1][1])


def _batch_dim(sharding: NamedSharding) -> int:
    return list(sharding.spec).index(DATA)
