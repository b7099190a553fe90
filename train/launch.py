"""python -m train.launch --processes P [--devices-per-process D] [--log-dir DIR] -- ARGS

Runs `python -m train ARGS` as P processes of one jax.distributed job on this machine, each
with D CPU devices (`--xla_force_host_platform_device_count`) and JAX's gloo collectives: the
multi-host code path of a cluster, run on one box. Process 0 writes to this terminal, the
others to DIR/process-<i>.log. When a process fails, the launcher kills the rest at once (no
collective can complete without it), prints the failed one's last lines and exits non-zero
naming it. SIGINT/SIGTERM are passed on to every process, so the run saves and stops as one.

    python -m train.launch --processes 2 --devices-per-process 2 -- \\
        --preset shakespeare --mesh data=4 --fsdp --out out/two-hosts
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2jax.sharding import NUM_PROCESSES_ENV, PROCESS_ID_ENV

_TAIL_LINES = 25


def free_port() -> int:
    """A TCP port nobody listens on now, for the coordinator (process 0 binds it)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(env: dict, index: int, processes: int, devices: int, port: int) -> dict:
    """`env` plus what makes a process number `index` of the job (see gpt2jax.sharding)."""
    count = "--xla_force_host_platform_device_count="
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    return {
        **env,
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        NUM_PROCESSES_ENV: str(processes),
        PROCESS_ID_ENV: str(index),
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": " ".join([*flags, f"{count}{devices}"]),
    }


def _say(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


def _how(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def launch(command: list[str], processes: int, devices_per_process: int = 1,
           log_dir: str | os.PathLike | None = None, poll_s: float = 0.1) -> int:
    """Run `command` as `processes` processes of one job; 0 when all succeed, else the status
    of the first to fail (128 + signal number when a signal killed it)."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"--processes {processes} and --devices-per-process "
                         f"{devices_per_process} must be >= 1")
    logs = Path(log_dir or tempfile.mkdtemp(prefix="gpt2jax-launch-"))
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    _say(f"{processes} processes x {devices_per_process} CPU devices, coordinator "
         f"localhost:{port}; logs of processes 1.. in {logs}")
    children, files = [], []
    previous = {}

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
        for i in range(processes):
            out = None
            if i:
                out = open(logs / f"process-{i}.log", "w")  # noqa: SIM115 (closed below)
                files.append(out)
            env = process_env(dict(os.environ), i, processes, devices_per_process, port)
            children.append(subprocess.Popen(command, env=env, stdout=out,
                                             stderr=subprocess.STDOUT if out else None))
            _say(f"process {i} pid {children[-1].pid}")
        while True:
            codes = [child.poll() for child in children]
            # Peers of a dead process often fail within the same poll (gloo: "connection
            # reset by peer"): one killed by a signal is the likelier cause, so it comes first.
            failed = sorted((i for i, code in enumerate(codes) if code not in (None, 0)),
                            key=lambda i: codes[i] > 0)
            if failed:
                return _stop_after_failure(children, failed, logs)
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_s)
    finally:
        for child in children:  # the launcher itself failed: leave nothing running
            if child.poll() is None:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for f in files:
            f.close()


def _stop_after_failure(children, failed: list[int], logs: Path) -> int:
    """Kill the survivors, show the failed processes' last lines, name them; the first
    one's status."""
    survivors = [child for child in children if child.poll() is None]
    for child in survivors:  # a collective with a dead peer never completes: no grace period
        child.kill()
    for child in survivors:
        child.wait()
    for i in failed[1:] + failed[:1]:  # the first-named failure's lines last, nearest its name
        if i:
            lines = (logs / f"process-{i}.log").read_text(errors="replace").splitlines()
            for line in lines[-_TAIL_LINES:]:
                print(f"[process {i}] {line}", file=sys.stderr)
    named = "; ".join(f"process {i} (pid {children[i].pid}) {_how(children[i].returncode)}"
                      for i in failed)
    _say(f"{named}; killed the {len(survivors)} still running (logs of processes 1.. in {logs})")
    code = children[failed[0]].returncode
    return code if code > 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m train.launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, required=True, help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="CPU devices each process simulates (default 1)")
    parser.add_argument("--log-dir", help="where processes 1.. write (default: a new temp dir)")
    args = parser.parse_args(argv[:split])
    try:
        return launch([sys.executable, "-m", "train", *argv[split + 1:]], args.processes,
                      args.devices_per_process, args.log_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
