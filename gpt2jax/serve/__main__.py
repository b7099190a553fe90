"""`python -m gpt2jax.serve --ckpt DIR`: an OpenAI-compatible completions server.

    python -m gpt2jax.serve --ckpt out/shakespeare [--cache float32|bfloat16|tq3] \\
        [--cache-memory 2GiB | --slots N] [--context 1024] [--host 127.0.0.1] [--port 8000]

The slots come from the cache budget: `--cache-memory` divided by one slot's cache bytes at
`--context` tokens (the cache kind's own nbytes); the server logs the slots x context it
chose. It serves the checkpoint folder's name as the model id and prints the URL when ready.
SIGTERM stops accepting, finishes the requests in flight (up to --grace seconds), exits 0.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

from gpt2jax import cli, sources
from gpt2jax.quant.turboquant import TurboQuantConfig

CACHE_KINDS = {"float32": "float32", "bfloat16": "bfloat16", "tq3": TurboQuantConfig(bits=3)}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"--cache-memory {text!r} is not a size: write e.g. 2GiB, 512MiB or "
                         f"1.5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def slots_for(budget: int, bytes_per_slot: int, context: int, kind: str) -> int:
    slots = budget // bytes_per_slot
    if slots < 1:
        raise ValueError(
            f"--cache-memory of {budget:,} bytes holds no slot: one slot of {context} tokens of "
            f"{kind} cache takes {bytes_per_slot:,} bytes; raise the budget or lower --context")
    return slots


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m gpt2jax.serve", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint (or run) folder to serve")
    p.add_argument("--cache", choices=list(CACHE_KINDS), default="float32",
                   help="what the KV cache stores (tq3: TurboQuant, 3 bits)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--cache-memory", type=str, help="cache budget, e.g. 2GiB (default 1GiB)")
    size.add_argument("--slots", type=int, help="number of cache slots")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per slot, prompt + completion (default: block_size)")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="decode steps per jitted call (docs/serving.md)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before HTTP 429")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p


def _serve(args) -> int:
    import uvicorn

    from gpt2jax.serve.api import create_app
    from gpt2jax.serve.engine import Engine, cache_bytes

    if args.slots is not None and args.slots < 1:
        raise ValueError(f"--slots {args.slots} must be >= 1")
    config, params = sources.load_checkpoint(args.ckpt)
    context = args.context or config.block_size
    kind = CACHE_KINDS[args.cache]
    per_slot = cache_bytes(config, context, kind)
    slots = args.slots or slots_for(parse_size(args.cache_memory or "1GiB"), per_slot, context,
                                    args.cache)
    engine = Engine(params, config, slots=slots, context=context, kv_cache=kind,
                    steps_per_call=args.steps_per_call, max_queue=args.max_queue)
    model_id = Path(args.ckpt).resolve().name
    print(f"{model_id}: {slots} slots x {context} tokens of {args.cache} cache "
          f"({slots * per_slot:,} bytes, {per_slot:,} per slot); compiling ...", flush=True)
    engine.warm_up()

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"serving {model_id} at http://{args.host}:{args.port}/v1", flush=True)

    server = Server(uvicorn.Config(create_app(engine, model_id), host=args.host, port=args.port,
                                   log_level="warning", timeout_graceful_shutdown=args.grace))
    # uvicorn drains on SIGTERM, then raises it again under the handler that was in place
    # before it ran: make that one a no-op, so that a drained server exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0


def main(argv=None) -> int:
    return cli.run(_serve, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
