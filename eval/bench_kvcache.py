"""Decode speed of the float32 cache against TurboQuant caches (a closer look;
`eval.bench_decode` carries the official figures).

    python -m eval.bench_kvcache [--preset gpt2] [--batches 1 8] [--prompt 512] [--new 512]
                                 [--rounds 3] [--json eval/results/bench_kvcache.json]

Random-init model of the preset's shape, greedy `generate` continuing a random prompt; per
batch size and cache: decode tokens/s = B * (new - 1) / (best full call - best 1-token call),
the calls of the caches taking turns so a busy spell of the shared cores hits all alike.

--per-layer F [F ...]: instead, one layer's decode attention (`cache.attend`) with a fraction F
of a max_len = prompt + new cache filled, per batch and cache: 10 attends chained in one jitted
`fori_loop` (as `generate`'s decode loop runs them), the best of 20 calls / 10, the sides taking
turns. It shows what reading only the filled prefix buys. One attend jitted alone would also
time glibc handing the program's temporaries (two float32 codeword blocks, 50 MB at batch 8)
back to the OS and faulting them in again on every call: 19.9 ms instead of 8.5 for tq3 at
batch 8, 90% filled.

The JSON is a `KVCacheResult` (end to end) or an `AttendResult` (--per-layer) record
(`eval.common.write_record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eval import common
from gpt2jax.cache import make_cache
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate
from gpt2jax.model import init_params
from gpt2jax.quant.turboquant import TurboQuantConfig

CACHES = {"fp32": "float32", "tq3": TurboQuantConfig(bits=3),
          "tq4prod": TurboQuantConfig(bits=4, key_quantizer="prod")}
CHAINED = 10  # attends per jitted call in --per-layer


@dataclasses.dataclass(frozen=True)
class KVCacheFigure:
    cache: str  # a CACHES name
    batch: int
    tok_s: float  # decode tokens/s after the prompt: B * (new - 1) / (full call - 1-token call)


@dataclasses.dataclass(frozen=True)
class KVCacheResult:
    preset: str
    machine: common.Machine
    code: str | None  # common.code_hash() at the run; None: run before records kept it
    command: str | None
    jax: str
    load_average_start: tuple[float, ...]
    load_average_end: tuple[float, ...]
    prompt: int
    new_tokens: int
    rounds: int  # calls per cache and length; the best counts
    figures: tuple[KVCacheFigure, ...]

    def over_fp32(self, cache: str, batch: int) -> float:
        speed = lambda name: common.lookup(self.figures, cache=name, batch=batch).tok_s
        return speed(cache) / speed("fp32")


@dataclasses.dataclass(frozen=True)
class AttendFigure:
    cache: str  # a CACHES name
    batch: int
    filled: float  # the fraction of max_len in the cache
    ms: float  # per attend: the best call of `attends_per_call` chained attends, divided


@dataclasses.dataclass(frozen=True)
class AttendResult:
    preset: str
    machine: common.Machine
    code: str | None
    command: str | None
    jax: str
    load_average_start: tuple[float, ...]
    load_average_end: tuple[float, ...]
    max_len: int
    attends_per_call: int
    figures: tuple[AttendFigure, ...]


def _seconds(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def run(preset: str, batches, prompt: int, new: int, rounds: int,
        caches) -> list[KVCacheFigure]:
    config = GPTConfig.preset(preset)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    figures = []
    for B in batches:
        prompts = rng.integers(0, config.vocab_size, (B, prompt)).tolist()
        calls = {(name, n): (lambda kind=CACHES[name], n=n, prompts=prompts: np.asarray(
            generate(params, config, prompts, max_new_tokens=n, key=jax.random.key(0),
                     temperature=0.0, kv_cache=kind))) for name in caches for n in (new, 1)}
        for call in calls.values():  # compile
            call()
        times = {key: [] for key in calls}
        for _ in range(rounds):
            for key, call in calls.items():
                times[key].append(_seconds(call))
        for name in caches:
            decode_s = min(times[name, new]) - min(times[name, 1])
            figures.append(KVCacheFigure(name, B, B * (new - 1) / decode_s))
            print(f"batch {B}, {prompt} + {new} tokens: {name} {figures[-1].tok_s:.2f} tok/s",
                  flush=True)
    return figures


def per_layer(preset: str, batches, max_len: int, fractions, caches, calls: int = 20,
              chained: int = CHAINED) -> list[AttendFigure]:
    """Milliseconds per attend of one layer's decode attention with a fraction of the cache
    filled (random keys and values): the best of `calls` calls over `chained`."""
    config = GPTConfig.preset(preset)
    H, D = config.n_head, config.head_dim
    rng = np.random.default_rng(0)
    normal = lambda B, T: jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    # each attend's output is the next one's query, so XLA cannot hoist or merge them
    attend = jax.jit(lambda c, q, k, v: jax.lax.fori_loop(
        0, chained, lambda _, q: c.attend(0, q, c.lengths[:, None], k, v), q))
    figures = []
    for B in batches:
        for fraction in fractions:
            filled = int(fraction * max_len)
            k, v, q, k1, v1 = normal(B, filled), normal(B, filled), *(normal(B, 1) for _ in "qkv")
            filled_caches = {name: make_cache(config, B, max_len, CACHES[name]).write(0, k, v)
                             .advance(filled).write(0, k1, v1) for name in caches}
            times = {name: [] for name in caches}
            for cache in filled_caches.values():  # compile
                attend(cache, q, k1, v1).block_until_ready()
            for _ in range(calls):
                for name, cache in filled_caches.items():
                    args = (cache, q, k1, v1)
                    times[name].append(_seconds(lambda a=args: attend(*a).block_until_ready()))
            cell = [AttendFigure(name, B, fraction, 1e3 * min(times[name]) / chained)
                    for name in caches]
            print(f"batch {B}, {fraction:g} filled: "
                  + " ".join(f"{t.cache} {t.ms:.2f} ms" for t in cell), flush=True)
            figures += cell
    return figures


def main(argv=None) -> None:
    p = argparse.ArgumentParser("python -m eval.bench_kvcache", description=__doc__)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--caches", nargs="+", default=["fp32", "tq3"], choices=list(CACHES))
    p.add_argument("--per-layer", type=float, nargs="+", metavar="F",
                   help="time one layer's attention at these filled fractions instead")
    p.add_argument("--json", type=Path, help="default eval/results/bench_kvcache[_layer].json")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    run_info = dict(preset=args.preset, machine=common.Machine.current(),
                    code=common.code_hash(),
                    command=common.command_line("eval.bench_kvcache", argv),
                    jax=jax.__version__, load_average_start=os.getloadavg())
    if args.per_layer:
        max_len = args.prompt + args.new
        figures = per_layer(args.preset, args.batches, max_len, args.per_layer, args.caches)
        result = AttendResult(**run_info, load_average_end=os.getloadavg(), max_len=max_len,
                              attends_per_call=CHAINED, figures=tuple(figures))
    else:
        figures = run(args.preset, args.batches, args.prompt, args.new, args.rounds,
                      args.caches)
        result = KVCacheResult(**run_info, load_average_end=os.getloadavg(),
                               prompt=args.prompt, new_tokens=args.new, rounds=args.rounds,
                               figures=tuple(figures))
        for f in (f for f in figures if f.cache != "fp32"):
            print(f"{f.cache} / fp32, batch {f.batch}: {result.over_fp32(f.cache, f.batch):.2f}")
    default = common.RESULTS / f"bench_kvcache{'_layer' if args.per_layer else ''}.json"
    print(f"wrote {common.write_record(args.json or default, result)}")


if __name__ == "__main__":
    main()
