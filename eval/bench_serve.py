"""Serving under load: what the cache's memory buys (claim 5, as capacity).

    python -m eval.bench_serve [--preset gpt2] [--clients 1 4 16 64] [--json PATH] [--readme]

A random-init model of the preset's shape is saved as a checkpoint and served by
`python -m gpt2jax.serve` (a child process on 127.0.0.1) once per cache kind — float32,
bfloat16 and TurboQuant 3-bit — all at the same cache budget: the bytes that hold 8 float32
sequences at the mix's longest context (256 + 256 tokens). Each kind's slots follow from its
own bytes per token. A fixed request mix (prompt 32–256 random tokens, 64–256 new, sampled at
temperature 1 with a seed each) is sent by C closed-loop clients (each sends its next
request when its last one completes; asyncio + httpx, streaming), for C in --clients: output
tokens/s, p50/p99 latency, p50/p99 time to first token, the server's peak resident memory,
and requests lost or duplicated. Beside it, the same requests through `gpt2jax.generate` one
at a time and as one static batch (compiles excluded: each shape runs once untimed first).

The JSON is a `ServeResult` record; --readme writes docs/serving.md's table and plot, and the
README's serving lines, from it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eval import common  # noqa: E402
from gpt2jax import checkpoint  # noqa: E402
from gpt2jax.config import PRESETS, GPTConfig  # noqa: E402
from gpt2jax.generation import generate  # noqa: E402
from gpt2jax.model import init_params  # noqa: E402
from gpt2jax.quant import int8  # noqa: E402
from gpt2jax.serve.__main__ import CACHE_KINDS  # noqa: E402
from gpt2jax.serve.engine import Engine, _step, cache_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "serving.md"
PROMPT_RANGE, NEW_RANGE = (32, 256), (64, 256)
CONTEXT = PROMPT_RANGE[1] + NEW_RANGE[1]
FLOAT32_SEQUENCES = 8  # the budget: this many float32 sequences at CONTEXT tokens
MIX_SIZE = 128
BASELINE_REQUESTS = 8
START_S, REQUEST_S = 900, 1800
CEILING_ROWS, CEILING_FILLED, CEILING_CALLS = (1, 8, 16, 64), (128, 480), 3
COUNTERS = {"gpt2jax_steps_total": "steps", "gpt2jax_step_rows_computed_total": "rows_computed",
            "gpt2jax_step_rows_live_total": "rows_live"}


@dataclasses.dataclass(frozen=True)
class LoadFigure:
    cache: str  # a gpt2jax.serve --cache name
    clients: int
    slots: int
    steps_per_call: int
    requests: int
    completed: int
    distinct_ids: int  # completion ids seen: completed - distinct = duplicated
    output_tokens: int
    wall_s: float
    tok_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    peak_rss_bytes: int
    engine: dict[str, float]  # the server's /metrics over the run: seconds by phase, rows

    @property
    def prefill_share(self) -> float:
        busy = self.engine["prefill_s"] + self.engine["step_s"]
        return self.engine["prefill_s"] / busy if busy else 0.0

    @property
    def row_use(self) -> float:
        """Of the slot rows the decode calls computed, the fraction that held a request."""
        return self.engine["rows_live"] / max(1.0, self.engine["rows_computed"])


@dataclasses.dataclass(frozen=True)
class BaselineFigure:
    mode: str  # "one at a time" | "static batch"
    requests: int
    output_tokens: int
    wall_s: float
    tok_s: float


@dataclasses.dataclass(frozen=True)
class CeilingFigure:
    """One decode call's device time, nothing else running: what a served step can reach."""

    cache: str
    rows: int  # live slots, all computed
    filled: int  # tokens each row's cache holds
    step_s: float  # per decode step (a call's time / steps_per_call)

    @property
    def tok_s(self) -> float:
        return self.rows / self.step_s


@dataclasses.dataclass(frozen=True)
class ServeResult:
    preset: str
    machine: common.Machine
    code: str
    command: str
    jax: str
    budget_bytes: int
    context: int
    weight_bytes: int
    bytes_per_slot: dict[str, int]
    mix: tuple[tuple[int, int], ...]  # (prompt tokens, new tokens) per request
    figures: tuple[LoadFigure, ...]
    baselines: tuple[BaselineFigure, ...]
    ceilings: tuple[CeilingFigure, ...]

    def figure(self, cache: str, clients: int, steps_per_call: int | None = None) -> LoadFigure:
        rows = [f for f in self.figures if f.cache == cache and f.clients == clients]
        if steps_per_call is None:
            steps_per_call = self.steps_per_call
        return common.lookup(rows, steps_per_call=steps_per_call)

    @property
    def steps_per_call(self) -> int:
        """The main sweep's k: the one every cache kind ran (the ablation is float32's)."""
        (k,) = set.intersection(*({f.steps_per_call for f in self.figures if f.cache == c}
                                  for c in {f.cache for f in self.figures}))
        return k

    def baseline(self, mode: str) -> BaselineFigure:
        return common.lookup(self.baselines, mode=mode)

    def ceiling(self, cache: str, rows: int, filled: int) -> CeilingFigure:
        return common.lookup(self.ceilings, cache=cache, rows=rows, filled=filled)


def request_mix(config: GPTConfig, size: int = MIX_SIZE, seed: int = 0) -> list[dict]:
    """The fixed mix: random prompt ids (no <|endoftext|>) of 32–256 tokens, 64–256 new."""
    rng = np.random.default_rng(seed)
    mix = []
    for i in range(size):
        prompt = rng.integers(0, min(config.vocab_size, 50256), rng.integers(*PROMPT_RANGE,
                                                                           endpoint=True))
        mix.append({"prompt": prompt.tolist(), "max_tokens": int(rng.integers(
            *NEW_RANGE, endpoint=True)), "seed": i})
    return mix


class Served:
    """`python -m gpt2jax.serve` on a free port, with its peak resident memory sampled."""

    def __init__(self, ckpt: Path, cache: str, budget: int, steps_per_call: int):
        import socket

        self.model = ckpt.name  # the server's model id
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2jax.serve", "--ckpt", str(ckpt), "--cache", cache,
             "--cache-memory", str(budget), "--context", str(CONTEXT), "--port", str(self.port),
             "--steps-per-call", str(steps_per_call), "--max-queue", "1024"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.slots, deadline = None, time.monotonic() + START_S
        for line in self.proc.stdout:
            print("  server:", line.rstrip())
            if " slots x " in line:
                self.slots = int(line.split(":")[1].split()[0])
            if line.startswith("serving ") or time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or self.slots is None:
            raise RuntimeError(f"gpt2jax.serve --cache {cache} did not start")
        self.peak_rss = 0
        self._sampling = True
        threading.Thread(target=self._sample_rss, daemon=True).start()
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def _sample_rss(self):
        import psutil  # the benchmark's own dependencies (dev extra), not the records'

        process = psutil.Process(self.proc.pid)
        while self._sampling and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            time.sleep(0.2)

    def engine_counters(self) -> dict[str, float]:
        """The engine's counters from /metrics: seconds by phase, decode calls, rows."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "gpt2jax_engine_seconds_total":
                    out[f"{sample.labels['phase']}_s"] = sample.value
                elif sample.name in COUNTERS:
                    out[COUNTERS[sample.name]] = sample.value
        return out

    def stop(self):
        self._sampling = False
        self.proc.terminate()
        self.proc.wait(120)


async def _one(client, url: str, request: dict) -> tuple[float, float, int, str]:
    """(time to first token, latency, completion tokens, completion id) of one streamed
    request."""
    start, first, tokens, ident = time.perf_counter(), None, 0, ""
    body = {**request, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ident = chunk["id"]
            if chunk["choices"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - start, time.perf_counter() - start, tokens, ident


async def _closed_loop(url: str, requests: list[dict], clients: int):
    """`clients` clients, each sending its next request when its last one completes."""
    import httpx

    pending = list(reversed(requests))
    results = []

    async def client_loop(client):
        while pending:
            results.append(await _one(client, url, pending.pop()))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=REQUEST_S, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - start


def load(served: Served, cache: str, mix: list[dict], clients: int,
         steps_per_call: int) -> LoadFigure:
    requests = [mix[i % len(mix)] for i in range(max(8, 2 * clients))]
    url = f"http://127.0.0.1:{served.port}/v1/completions"
    requests = [{**r, "model": served.model} for r in requests]
    served.peak_rss = 0
    before = served.engine_counters()
    results, wall = asyncio.run(_closed_loop(url, requests, clients))
    engine = {k: v - before[k] for k, v in served.engine_counters().items()}
    ttft, latency, tokens, ids = zip(*results, strict=True)
    pct = lambda xs, q: float(np.percentile(xs, q))
    figure = LoadFigure(
        cache=cache, clients=clients, slots=served.slots, steps_per_call=steps_per_call,
        requests=len(requests), completed=len(results), distinct_ids=len(set(ids)),
        output_tokens=int(sum(tokens)), wall_s=wall, tok_s=sum(tokens) / wall,
        latency_p50_s=pct(latency, 50), latency_p99_s=pct(latency, 99),
        ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), peak_rss_bytes=served.peak_rss,
        engine=engine)
    print(f"  {cache:>8} {clients:>3} clients ({served.slots} slots, k={steps_per_call}): "
          f"{figure.tok_s:7.1f} tok/s  latency p50 {figure.latency_p50_s:6.2f} p99 "
          f"{figure.latency_p99_s:6.2f} s  ttft p50 {figure.ttft_p50_s:5.2f} p99 "
          f"{figure.ttft_p99_s:5.2f} s  rss {served.peak_rss / 2**20:,.0f} MiB\n"
          f"           engine: prefill {engine['prefill_s']:.1f} s, decode {engine['step_s']:.1f}"
          f" s, hand-out {engine['hand_out_s']:.1f} s of {wall:.1f}; rows used "
          f"{figure.row_use:.0%}", flush=True)
    return figure


def baselines(params, config: GPTConfig, mix: list[dict]) -> list[BaselineFigure]:
    """The first BASELINE_REQUESTS of the mix through `gpt2jax.generate`: one at a time, and
    as one static batch (to the longest max_tokens; only the requested tokens count)."""
    requests = mix[:BASELINE_REQUESTS]
    run = lambda prompts, n, seed: np.asarray(generate(
        params, config, prompts, max_new_tokens=n, key=jax.random.key(seed), temperature=1.0))
    for r in requests:  # compile each shape untimed
        run([r["prompt"]], r["max_tokens"], 0)
    start = time.perf_counter()
    for r in requests:
        run([r["prompt"]], r["max_tokens"], r["seed"])
    alone = time.perf_counter() - start
    longest = max(r["max_tokens"] for r in requests)
    prompts = [r["prompt"] for r in requests]
    run(prompts, longest, 0)
    start = time.perf_counter()
    run(prompts, longest, 1)
    batched = time.perf_counter() - start
    tokens = sum(r["max_tokens"] for r in requests)
    return [BaselineFigure("one at a time", len(requests), tokens, alone, tokens / alone),
            BaselineFigure("static batch", len(requests), tokens, batched, tokens / batched)]


def ceilings(params, config: GPTConfig, slots: dict[str, int],
             steps_per_call: int) -> list[CeilingFigure]:
    """Device time of one decode call at CEILING_ROWS live rows (capped at each kind's slots)
    whose caches hold CEILING_FILLED tokens: the served figures' upper bound. TurboQuant reads
    only the filled prefix of its codes, so its cost follows the longest live request."""
    out = []
    for cache, kind in CACHE_KINDS.items():
        for rows in sorted({min(r, slots[cache]) for r in CEILING_ROWS}):
            engine = Engine(params, config, slots=rows, context=CONTEXT, kv_cache=kind,
                            steps_per_call=steps_per_call)
            for filled in CEILING_FILLED:
                state = engine._empty_state()
                state = state.replace(
                    cache=state.cache.replace(lengths=jnp.full((rows,), filled, jnp.int32)),
                    live_S=jnp.ones((rows,), bool), max_new_S=jnp.full((rows,), CONTEXT))
                step = functools.partial(_step, params, config=config, steps=steps_per_call,
                                         rows=rows)
                state = jax.block_until_ready(step(state)[0])  # compile
                start = time.perf_counter()
                for _ in range(CEILING_CALLS):
                    state = step(state)[0]
                jax.block_until_ready(state)
                step_s = (time.perf_counter() - start) / CEILING_CALLS / steps_per_call
                out.append(CeilingFigure(cache, rows, filled, step_s))
                print(f"  {cache:>8} {rows:>3} rows, {filled} filled: {step_s * 1e3:6.1f} "
                      f"ms/step, {rows / step_s:6.1f} tok/s", flush=True)
    return out


def run(preset: str, clients: list[int], steps_per_call: int, ablation: list[int],
        argv: list[str]) -> ServeResult:
    config = GPTConfig.preset(preset)
    params = init_params(config, jax.random.key(0))
    mix = request_mix(config)
    per_slot = {name: cache_bytes(config, CONTEXT, kind) for name, kind in CACHE_KINDS.items()}
    budget = FLOAT32_SEQUENCES * per_slot["float32"]
    print(f"budget {budget:,} bytes: float32 {FLOAT32_SEQUENCES} x {CONTEXT} tokens", flush=True)
    print("baselines (gpt2jax.generate) ...", flush=True)
    base = baselines(params, config, mix)
    for b in base:
        print(f"  {b.mode}: {b.tok_s:.1f} tok/s", flush=True)
    print("ceilings (decode calls alone) ...", flush=True)
    ceiling = ceilings(params, config, {c: budget // per_slot[c] for c in CACHE_KINDS},
                       steps_per_call)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / preset
        checkpoint.save_params(ckpt, config, params)
        for cache in CACHE_KINDS:
            for k in [steps_per_call, *(ablation if cache == "float32" else [])]:
                served = Served(ckpt, cache, budget, k)
                try:
                    levels = clients if k == steps_per_call else [16]
                    figures += [load(served, cache, mix, c, k) for c in levels]
                finally:
                    served.stop()
    return ServeResult(
        preset=preset, machine=common.Machine.current(), code=common.code_hash(),
        command=common.command_line("eval.bench_serve", argv), jax=jax.__version__,
        budget_bytes=budget, context=CONTEXT, weight_bytes=int8.nbytes(params),
        bytes_per_slot=per_slot, mix=tuple((len(r["prompt"]), r["max_tokens"]) for r in mix),
        figures=tuple(figures), baselines=tuple(base), ceilings=tuple(ceiling))


def plot(result: ServeResult, path: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    k = result.steps_per_call
    for cache in CACHE_KINDS:
        rows = sorted((f for f in result.figures if f.cache == cache and f.steps_per_call == k),
                      key=lambda f: f.clients)
        label = f"{cache} ({rows[0].slots} slots)"
        ax1.plot([f.clients for f in rows], [f.tok_s for f in rows], "o-", label=label)
        ax2.plot([f.clients for f in rows], [f.latency_p99_s for f in rows], "o-", label=label)
    ax1.axhline(result.baseline("one at a time").tok_s, color="gray", ls="--",
                label="generate, one at a time")
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpt2jax.serve, {result.preset} shape, same cache budget "
                 f"({result.budget_bytes / 2**20:.0f} MiB), {result.machine.cpu}")
    return common.save_figure(fig, path)


def table(result: ServeResult) -> str:
    """docs/serving.md's table, every figure from the record."""
    k = result.steps_per_call
    alone = result.baseline("one at a time")
    lines = [f"{result.preset} shape, random weights, on {result.machine.cpu} "
             f"({result.machine.cores} cores), code `{result.code}`: `{result.command}`. "
             f"Cache budget {result.budget_bytes:,} bytes (float32: {FLOAT32_SEQUENCES} "
             f"sequences of {result.context} tokens); weights {result.weight_bytes:,} bytes; "
             f"{k} decode steps per call.", "",
             f"`gpt2jax.generate` on the first {alone.requests} requests: one at a time "
             f"{alone.tok_s:.1f} tok/s, as one static batch "
             f"{result.baseline('static batch').tok_s:.1f} tok/s.", "",
             "| cache | slots | clients | tok/s | × one at a time | latency p50 / p99 (s) | "
             "first token p50 / p99 (s) | peak RSS (MiB) | lost / duplicated | prefill share "
             "| rows used |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in sorted((f for f in result.figures if f.steps_per_call == k),
                    key=lambda f: (list(CACHE_KINDS).index(f.cache), f.clients)):
        lines.append(
            f"| {f.cache} | {f.slots} | {f.clients} | {f.tok_s:.1f} | {f.tok_s / alone.tok_s:.2f}"
            f" | {f.latency_p50_s:.2f} / {f.latency_p99_s:.2f} | {f.ttft_p50_s:.2f} / "
            f"{f.ttft_p99_s:.2f} | {f.peak_rss_bytes / 2**20:,.0f} | "
            f"{f.requests - f.completed} / {f.completed - f.distinct_ids} | "
            f"{f.prefill_share:.0%} | {f.row_use:.0%} |")
    ablation = sorted((f for f in result.figures if f.clients == 16 and f.cache == "float32"),
                      key=lambda f: f.steps_per_call)
    if len(ablation) > 1:
        lines += ["", "Decode steps per jitted call (float32, 16 clients): " + ", ".join(
            f"k={f.steps_per_call}: {f.tok_s:.1f} tok/s, first token p99 {f.ttft_p99_s:.2f} s"
            for f in ablation) + "."]
    most = max(f.clients for f in result.figures)
    lines += ["", f"Where the engine thread's time went at {most} clients, and what the same "
              "decode call reaches alone (its ceiling: the most rows measured, at each filled "
              "length):", "",
              "| cache | wall (s) | prefill (s) | decode (s) | hand-out (s) | ms per decode step "
              "| live / computed rows per call | served tok/s | ceiling tok/s "
              + " / ".join(str(n) for n in CEILING_FILLED) + " filled | served / ceiling |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cache in CACHE_KINDS:
        f, e = result.figure(cache, most), result.figure(cache, most).engine
        rows = max(c.rows for c in result.ceilings if c.cache == cache)
        top = [result.ceiling(cache, rows, n).tok_s for n in CEILING_FILLED]
        calls = max(1.0, e["steps"])
        lines.append(
            f"| {cache} | {f.wall_s:.1f} | {e['prefill_s']:.1f} | {e['step_s']:.1f} | "
            f"{e['hand_out_s']:.1f} | {e['step_s'] / (calls * k) * 1e3:.0f} | "
            f"{e['rows_live'] / calls:.1f} / {e['rows_computed'] / calls:.1f} | {f.tok_s:.1f} | "
            f"{rows} rows: " + " / ".join(f"{t:.1f}" for t in top) + " | "
            + " / ".join(f"{f.tok_s / t:.0%}" for t in top) + " |")
    lines += ["", "Prefill share: of the engine thread's prefill and decode time, the part spent "
              "prefilling. Rows used: of the rows the decode calls computed, the part that held a "
              "request.", "", f"Decode calls alone ({k} steps each, nothing else running): "
              "tokens/s by live rows and tokens in each row's cache.", "",
              "| cache | rows | " + " | ".join(f"{n} filled" for n in CEILING_FILLED) + " |",
              "|---|---:|" + "---:|" * len(CEILING_FILLED)]
    for cache in CACHE_KINDS:
        for rows in sorted({c.rows for c in result.ceilings if c.cache == cache}):
            lines.append(f"| {cache} | {rows} | " + " | ".join(
                f"{result.ceiling(cache, rows, n).tok_s:.1f}" for n in CEILING_FILLED) + " |")
    return "\n".join(lines)


def summary(result: ServeResult) -> str:
    """The README's serving lines: capacity and throughput by cache kind, from the record."""
    most = max(f.clients for f in result.figures)
    rows = {kind: result.figure(kind, most) for kind in CACHE_KINDS}
    f32 = rows["float32"]
    held = ", ".join(f"{kind} {f.slots}" for kind, f in rows.items())
    speed = ", ".join(f"{kind} {f.tok_s:.0f}" for kind, f in rows.items())
    return (f"Serving the {result.preset} shape (`{result.command}`, {result.machine.cpu}, "
            f"{result.machine.cores} cores): one cache budget of "
            f"{result.budget_bytes / 2**20:.0f} MiB holds sequences of {result.context} tokens: "
            f"{held}. At {most} closed-loop clients that is {speed} output tokens/s (TurboQuant "
            f"{rows['tq3'].tok_s / f32.tok_s:.2f}× float32); `gpt2jax.generate` one request "
            f"at a time: {result.baseline('one at a time').tok_s:.0f} tok/s. Latency, time to "
            f"first token and the plot: [docs/serving.md](docs/serving.md#under-load).")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser("python -m eval.bench_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="gpt2")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--steps-per-call", type=int, default=4)
    p.add_argument("--ablation", type=int, nargs="*", default=[1, 8],
                   help="other steps-per-call values, float32 at 16 clients")
    p.add_argument("--json", type=Path, default=common.RESULTS / "bench_serve.json")
    p.add_argument("--readme", action="store_true",
                   help="only rewrite docs/serving.md's table and plot from the JSON")
    args = p.parse_args(argv)
    if not args.readme:
        result = run(args.preset, args.clients, args.steps_per_call, args.ablation, argv)
        common.write_record(args.json, result)
    result = common.read_record(args.json, ServeResult)
    plot(result, args.json.with_suffix(".png"))
    common.write_readme_block("bench_serve", table(result), DOC)
    common.write_readme_block("serving", summary(result))
    print(table(result))


if __name__ == "__main__":
    main()
