"""Decode speed: gpt2jax.generate against Hugging Face transformers, with and without KV cache.

    python -m eval.bench_decode [--preset gpt2] [--ckpt DIR] [--json PATH] [--png PATH]
                                [--quick] [--readme]

One run, same weights on both sides (random, or `--ckpt`'s; exported with gpt2jax.hf.save
and loaded by GPT2LMHeadModel), same threads (the cores this process may use), greedy:

- two PyTorch references: HF `generate`, and `torch_loop`, a bare greedy loop over HF's
  model with a preallocated (static) KV cache and no `generate` overhead;
- headline: prompt 32 + 128 new tokens (--quick: 16 + 16), tokens/s of the whole call, at
  batch 1 and batch 8; with the cache also on int8 weights in each mode (`int8`: weights
  only; `w8a8`: int8 activations too; `w8a8_emb`: and `wte` int8) and with TurboQuant
  caches (3-bit mse keys `tq3`, 4-bit prod keys `tq4prod`), each against the float32
  cache: speed ratio and share of greedy tokens equal to its (on random weights only
  indicative: near-tied logits flip);
- sweep: batch 1 and 8 at total lengths 64..1024. With the cache, the decode rate up to that
  length: a prompt of half of it, then the other half as new tokens, minus the same call
  with 1 new token (the prefill), so prefill time does not hide in it; the 3-bit
  TurboQuant cache too at the longest length. Without the cache every token costs one full
  forward over the sequence: 4 new tokens ending at that length (batch 8 up to 256 tokens:
  beyond, one call of recompute costs minutes and the trend is plain);
- every cell: one untimed warm-up call per side (compiles ours; HF's first call allocates
  too), then 5 timed calls per side taking turns, and the median. Compile time is the
  warm-up call minus that median;
- KV-cache bytes from the arrays next to the formula 2 * n_layer * B * T * n_embd * bytes;
- the memory-bandwidth bound: a batch-1 decode step must read every weight once, so it
  cannot beat (measured DRAM read bandwidth) / (weight bytes).

--quick runs 2 layers of the `baby` preset at 128 dims with a 512-token vocabulary, length 32,
batch 1 only, 1 call per cell: a smoke run.
--readme writes docs/results.md's decode table from the JSON (`<!-- bench_decode:` markers).
The JSON is a `DecodeResult` record (`eval.common.write_record`); readers look figures up
through it (`DecodeResult.figure`, `.cell`) and compute every ratio from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from eval import common
from gpt2jax import hf, sources
from gpt2jax.cache import init_cache, make_cache
from gpt2jax.config import PRESETS, GPTConfig
from gpt2jax.generation import generate
from gpt2jax.model import init_params
from gpt2jax.quant import int8
from gpt2jax.quant.turboquant import TurboQuantConfig

# torch's OpenMP workers spin at every barrier; on cores shared with other processes that
# made HF 5-20x slower (baby, cache: 17.6 -> 83.5 tok/s, measured). Waiting passively is
# the generous setting for the baseline. Set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (64, 128, 256, 512, 1024)
QUICK_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 128, "vocab_size": 512}
QUICK_LENGTHS = (32,)  # its cached cell reuses the headline's programs (16 + 16)
BATCHES = (1, 8)
HEADLINE, QUICK_HEADLINE = (32, 128), (16, 16)  # prompt tokens, new tokens
NOCACHE_HEADLINE_NEW = 32  # recompute is ~10x slower: 128 new tokens x 6 calls took 6 min
NOCACHE_NEW = 4
NOCACHE_MAX_LENGTH_B8 = 256
ROUNDS, QUICK_ROUNDS = 5, 1  # timed calls per side and cell (the median counts); --quick is a
# smoke run of the whole program, not a measurement
INT8 = {"int8": dict(mode="weights"), "w8a8": dict(mode="w8a8"),
        "w8a8_emb": dict(mode="w8a8", embeddings=True)}
TURBOQUANT = {"tq3": TurboQuantConfig(bits=3),
              "tq4prod": TurboQuantConfig(bits=4, key_quantizer="prod")}
NO_CACHE = "none"  # a figure's cache when every token recomputes the whole sequence


@dataclasses.dataclass(frozen=True)
class HeadlineFigure:
    """One side's tokens/s of a whole `generate` call: the headline prompt + new tokens."""

    side: str  # "gpt2jax", "hf" (transformers' generate) or "torch_loop"
    cache: str  # "float32", a TURBOQUANT tag, or NO_CACHE
    weights: str  # "float32" or an INT8 tag
    batch: int
    tok_s: float
    compile_s: float  # the warm-up call's excess over the median; 0 for torch's sides
    # share of the greedy tokens equal to float32 gpt2jax's in the same cell; None for that side
    # itself, and where a run made before the records did not compare them
    greedy_match: float | None


@dataclasses.dataclass(frozen=True)
class SweepFigure:
    """One side's decode rate at a total length: with the cache, the new tokens after the
    first (the prefill subtracted); without it, every new token (each one full forward)."""

    side: str  # "gpt2jax" or "hf"
    cache: str  # "float32", a TURBOQUANT tag, or NO_CACHE
    batch: int
    length: int  # prompt + new tokens
    new_tokens: int
    steady_s: float  # median seconds of the call
    prefill_s: float | None  # of the same call making 1 token; None without the cache
    compile_s: float
    tok_s: float  # NaN where the noise exceeded the decode time


@dataclasses.dataclass(frozen=True)
class CacheBytes:
    """The float32 cache at a sweep cell: its arrays' bytes (without the lengths) and the
    formula's, 2 * n_layer * B * T * n_embd * 4."""

    batch: int
    length: int
    arrays: int
    formula: int


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    total: int
    per_step: int  # what a batch-1 decode step reads: all but wpe (it reads one row)


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Best DRAM read GB/s of a jitted sum and of a matrix-vector product."""

    sum_GBps: float
    matvec_GBps: float

    @property
    def GBps(self) -> float:
        return max(self.sum_GBps, self.matvec_GBps)


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    preset: str  # or the checkpoint whose weights ran (--ckpt)
    quick: bool
    machine: common.Machine
    code: str | None  # common.code_hash() at the run; None: run before records kept it
    command: str | None
    threads: int
    jax: str
    torch: str
    transformers: str
    xla_flags: str
    omp_wait_policy: str
    rounds: int  # timed calls per side and cell; the median counts
    load_average_start: tuple[float, ...]
    load_average_end: tuple[float, ...]
    batches: tuple[int, ...]
    lengths: tuple[int, ...]  # the sweep's total lengths
    headline_prompt: int
    headline_new_tokens: int
    nocache_headline_new_tokens: int
    bandwidth: Bandwidth  # the better of before and after the cells
    weight_bytes: dict[str, WeightBytes]  # "float32" and each INT8 tag
    kv_bytes_headline: dict[str, int]  # cache kind -> bytes at batch 1, headline length
    kv_bytes_longest: dict[str, int]  # ... at batch 1, the longest length
    headline: tuple[HeadlineFigure, ...]
    sweep: tuple[SweepFigure, ...]
    float32_cache_bytes: tuple[CacheBytes, ...]  # at every gpt2jax sweep cell

    def figure(self, side: str = "gpt2jax", *, cache: str = "float32",
               weights: str = "float32", batch: int = 1) -> HeadlineFigure:
        return common.lookup(self.headline, side=side, cache=cache, weights=weights,
                             batch=batch)

    def cell(self, side: str = "gpt2jax", *, cache: str = "float32", batch: int,
             length: int) -> SweepFigure:
        return common.lookup(self.sweep, side=side, cache=cache, batch=batch, length=length)

    def recomputed(self, batch: int, length: int) -> bool:
        """Whether the sweep ran without the cache at this cell (batch 8 stops early)."""
        return any((f.cache, f.batch, f.length) == (NO_CACHE, batch, length)
                   for f in self.sweep)

    def speedup(self, side: str, batch: int, length: int) -> float:
        """The cache's decode rate over recomputing's, in the sweep."""
        return (self.cell(side, batch=batch, length=length).tok_s
                / self.cell(side, cache=NO_CACHE, batch=batch, length=length).tok_s)

    def cache_bytes(self, batch: int, length: int) -> CacheBytes:
        return common.lookup(self.float32_cache_bytes, batch=batch, length=length)

    def bound_tok_s(self, weights: str = "float32") -> float:
        """The batch-1 bound: a decode step must read every weight once from DRAM."""
        return self.bandwidth.GBps * 1e9 / self.weight_bytes[weights].per_step

    def int8_ratios(self, batch: int) -> dict[str, float]:
        """{INT8 tag: its headline tok/s over float32's} at this batch."""
        fp32 = self.figure(batch=batch).tok_s
        return {tag: self.figure(weights=tag, batch=batch).tok_s / fp32 for tag in INT8}

    def best_int8(self, batch: int) -> tuple[str, float]:
        """(the fastest int8 mode, its speed over float32) at this batch."""
        ratios = self.int8_ratios(batch)
        best = max(ratios, key=ratios.get)
        return best, ratios[best]


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 8) -> Bandwidth:
    """Best DRAM read GB/s of a jitted sum and of a matrix-vector product over `nbytes`."""
    rows = nbytes // (4 * 1024)
    a = jnp.ones((rows, 1024), jnp.float32)
    x = jnp.ones((1024,), jnp.float32)
    best = []
    for fn, args in ((jax.jit(jnp.sum), (a,)), (jax.jit(jnp.dot), (a, x))):
        fn(*args).block_until_ready()
        seconds = min(_seconds(lambda fn=fn, args=args: fn(*args).block_until_ready())
                      for _ in range(repeats))
        best.append(a.nbytes / seconds / 1e9)
    return Bandwidth(*best)


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Ours:
    side, compiles = "gpt2jax", True

    def __init__(self, config: GPTConfig, params, weights: str = "float32",
                 kv: str = "float32"):
        self.config, self.params = config, params
        self.weights, self.kv = weights, kv  # kv: the cache kind, "float32" or a TURBOQUANT tag

    def __call__(self, prompts: np.ndarray, new: int, cache: bool) -> np.ndarray:
        out = generate(self.params, self.config, prompts.tolist(), max_new_tokens=new,
                       key=jax.random.key(0), temperature=0.0, use_cache=cache,
                       kv_cache=TURBOQUANT.get(self.kv))
        return np.asarray(out)


class HuggingFace:
    side, compiles, weights, kv = "hf", False, "float32", "float32"

    def __init__(self, model):
        import torch

        self.torch, self.model = torch, model

    def __call__(self, prompts: np.ndarray, new: int, cache: bool) -> np.ndarray:
        ids = self.torch.from_numpy(prompts.astype(np.int64))
        with self.torch.inference_mode():  # min_new_tokens: a random model must not stop early
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                      do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                      use_cache=cache, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()


class TorchLoop(HuggingFace):
    """Greedy decoding as a bare loop over HF's model with a preallocated StaticCache: what
    PyTorch does without `generate`'s logits processors, stopping checks and bookkeeping."""

    side = "torch_loop"

    def __call__(self, prompts: np.ndarray, new: int, cache: bool) -> np.ndarray:
        import transformers

        if not cache:
            raise ValueError("torch_loop decodes with its static cache only")
        torch = self.torch
        ids = torch.from_numpy(prompts.astype(np.int64))
        P = ids.shape[1]
        kv = transformers.StaticCache(config=self.model.config, max_cache_len=P + new)
        out = []
        with torch.inference_mode():
            step_ids, positions = ids, torch.arange(P)
            for _ in range(new):
                logits = self.model(input_ids=step_ids, past_key_values=kv, use_cache=True,
                                    cache_position=positions, logits_to_keep=1).logits
                step_ids = logits[:, -1].argmax(-1, keepdim=True)
                out.append(step_ids)
                positions = positions[-1:] + 1
        return torch.cat(out, 1).numpy()


def _call(side, prompts, new: int, cache: bool):
    t = time.perf_counter()
    out = side(prompts, new, cache)
    seconds = time.perf_counter() - t
    if out.shape != (prompts.shape[0], new):
        raise RuntimeError(f"{side.side} ({side.weights} weights, {side.kv} cache) returned "
                           f"{out.shape}, expected {(prompts.shape[0], new)}")
    return seconds, out


def timed(sides, prompts, new: int, cache: bool, rounds: int) -> dict:
    """{side: (compile s, median steady s, tokens [B, new])} over `rounds` calls each.

    Every side gets one untimed warm-up call first; then the sides take turns, so a busy
    spell of the shared cores hits all alike, and the median call counts. A side that
    compiles: its warm-up call's excess over the median is the compile time."""
    first = {s: _call(s, prompts, new, cache)[0] for s in sides}
    times, outs = {s: [] for s in sides}, {}
    for _ in range(rounds):
        for s in sides:
            seconds, outs[s] = _call(s, prompts, new, cache)
            times[s].append(seconds)
    return {s: (max(first[s] - statistics.median(ts), 0.0) if s.compiles else 0.0,
                statistics.median(ts), outs[s]) for s, ts in times.items()}


def measure(sides, prompts: np.ndarray, cache: bool, new: int, rounds: int) -> list[SweepFigure]:
    """One figure per side: decode tokens/s continuing `prompts` [B, P] by `new` tokens."""
    B = prompts.shape[0]
    full = timed(sides, prompts, new, cache, rounds)
    if cache:  # subtract the prefill: a 1-token call on the same prompt
        prefill = timed(sides, prompts, 1, cache, rounds)
    figures = []
    for side, (compile_s, steady, _) in full.items():
        if cache:
            prefill_s = prefill[side][1]
            decode_s = steady - prefill_s  # NaN, not a wild number, if noise wins
            tok_s = B * (new - 1) / decode_s if decode_s > 0 else float("nan")
        else:  # each token is one full forward, the first one included
            prefill_s, tok_s = None, B * new / steady
        figures.append(SweepFigure(side.side, side.kv if cache else NO_CACHE, B,
                                   prompts.shape[1] + new, new, steady, prefill_s, compile_s,
                                   tok_s))
    return figures


def int8_variants(params) -> dict:
    """The int8 sides: {tag: quantized params} (SmoothQuant changes quality, not speed)."""
    return {tag: int8.quantize(params, **kwargs) for tag, kwargs in INT8.items()}


def run(preset: str, quick: bool, ckpt: str | None = None, lengths=None,
        command: str | None = None) -> DecodeResult:
    import torch
    import transformers

    threads = common.cores()
    rounds = QUICK_ROUNDS if quick else ROUNDS
    torch.set_num_threads(threads)  # XLA's CPU client uses every core it is given
    if ckpt:
        config, params = sources.load_checkpoint(ckpt)
        params = int8.dequantize(params)  # the float32 side; int8 sides are made from it
    else:
        # a smoke run keeps 2 of the preset's layers (with a cache each layer is its own
        # code) at 128 dims and a 512-token vocabulary (random weights need no tokenizer):
        # it checks the program, and the 50257-wide lm_head was most of its compute at -O0
        config = GPTConfig.preset(preset, **(QUICK_SHAPE if quick else {}))
        params = init_params(config, jax.random.key(0))
    lengths = [n for n in (lengths or (QUICK_LENGTHS if quick else LENGTHS))
               if n <= config.block_size]
    batches = BATCHES[:1] if quick else BATCHES
    rng = np.random.default_rng(0)
    prompt = lambda B, P: rng.integers(0, config.vocab_size, (B, P))

    # a smoke run only checks the program: 64 MiB, not the 1 GiB that defeats the caches
    probe = dict(nbytes=1 << 26, repeats=2) if quick else {}
    bandwidth = measure_read_bandwidth(**probe)
    code, load_average_start = common.code_hash(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(config, params, tmp)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    hf_sides = (HuggingFace(model), TorchLoop(model))
    ours = Ours(config, params)
    quantized = int8_variants(params)
    int8_sides = tuple(Ours(config, q, weights=tag) for tag, q in quantized.items())
    wpe_bytes = params["wpe"]["embedding"].nbytes if "wpe" in params else 0
    weight_bytes = {tag: WeightBytes(int8.nbytes(p), int8.nbytes(p) - wpe_bytes)
                    for tag, p in {"float32": params, **quantized}.items()}
    tq_sides = {tag: Ours(config, params, kv=tag) for tag in TURBOQUANT}

    P, N = QUICK_HEADLINE if quick else HEADLINE
    headline_prompts = {B: prompt(B, P) for B in batches}
    jobs = [("headline", (ours, *hf_sides, *int8_sides, *tq_sides.values()),
             headline_prompts[1], True, N),
            ("headline", (ours, hf_sides[0]), headline_prompts[1], False,
             min(N, NOCACHE_HEADLINE_NEW))]
    if 8 in batches:
        jobs.append(("headline", (ours, *hf_sides, *int8_sides), headline_prompts[8], True, N))
    for B in batches:
        for L in lengths:
            # the 3-bit cache where its reads weigh most, taking turns with the float one
            long = L == lengths[-1]
            jobs.append(("sweep", (ours, hf_sides[0], *((tq_sides["tq3"],) if long else ())),
                         prompt(B, L // 2), True, L // 2))
            if B == 1 or L <= NOCACHE_MAX_LENGTH_B8:
                jobs.append(("sweep", (ours, hf_sides[0]), prompt(B, L - NOCACHE_NEW), False,
                             NOCACHE_NEW))

    headline, sweep = [], []
    for kind, job_sides, prompts, cache, new in tqdm(jobs, desc="decode benchmark",
                                                     unit="cell"):
        if kind == "sweep":
            sweep += measure(job_sides, prompts, cache, new, rounds)
            continue
        # the headline is end to end: new tokens / wall seconds of the whole generate call
        B = prompts.shape[0]
        timings = timed(job_sides, prompts, new, cache, rounds)
        reference = timings[ours][2]  # every headline cell has float32 gpt2jax
        for side, (compile_s, steady, out) in timings.items():
            headline.append(HeadlineFigure(
                side.side, side.kv if cache else NO_CACHE, side.weights, B, B * new / steady,
                compile_s, None if side is ours else float(np.mean(out == reference))))
    float32_cache_bytes = tuple(
        CacheBytes(f.batch, f.length,
                   init_cache(config, f.batch, f.length).nbytes - 4 * f.batch,  # minus lengths
                   2 * config.n_layer * f.batch * f.length * config.n_embd * 4)
        for f in sweep if (f.side, f.cache) == ("gpt2jax", "float32"))
    kinds = {"float32": "float32", "float16": "float16", **TURBOQUANT}
    kv_bytes = lambda L: {name: make_cache(config, 1, L, kind).nbytes
                          for name, kind in kinds.items()}
    load_average_end = os.getloadavg()
    # measured before and after the sweep: the better is what the machine can do
    end = measure_read_bandwidth(**probe)
    return DecodeResult(
        preset=ckpt or preset, quick=quick, machine=common.Machine.current(), code=code,
        command=command, threads=threads, jax=jax.__version__, torch=torch.__version__,
        transformers=transformers.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
        omp_wait_policy=os.environ["OMP_WAIT_POLICY"], rounds=rounds,
        load_average_start=load_average_start, load_average_end=load_average_end,
        batches=tuple(batches), lengths=tuple(lengths), headline_prompt=P,
        headline_new_tokens=N, nocache_headline_new_tokens=min(N, NOCACHE_HEADLINE_NEW),
        bandwidth=Bandwidth(max(bandwidth.sum_GBps, end.sum_GBps),
                            max(bandwidth.matvec_GBps, end.matvec_GBps)),
        weight_bytes=weight_bytes, kv_bytes_headline=kv_bytes(P + N),
        kv_bytes_longest=kv_bytes(lengths[-1]), headline=tuple(headline), sweep=tuple(sweep),
        float32_cache_bytes=float32_cache_bytes)


def _host(r: DecodeResult) -> str:
    m = r.machine
    return f"{m.cpu}, {m.cores} cores ({m.sched})"


def format_table(r: DecodeResult) -> str:
    P, N = r.headline_prompt, r.headline_new_tokens
    bw = r.bandwidth
    load = "/".join(f"{x:.1f}" for x in (r.load_average_start[0], r.load_average_end[0]))
    fp32, nocache, torch_loop = r.figure(), r.figure(cache=NO_CACHE), r.figure("torch_loop")
    hf_cache, hf_nocache = r.figure("hf"), r.figure("hf", cache=NO_CACHE)
    lines = [
        f"{r.preset} | {_host(r)} (load average start/end {load}) | jax {r.jax}, "
        f"torch {r.torch} | median of {r.rounds} calls per cell",
        f"read bandwidth {bw.GBps:.1f} GB/s (sum {bw.sum_GBps:.1f}, matvec "
        f"{bw.matvec_GBps:.1f}); weights read per step "
        f"{r.weight_bytes['float32'].per_step / 1e6:.0f} MB -> batch-1 bound "
        f"{r.bound_tok_s():.1f} tok/s",
        "",
        f"headline: prompt {P} + {N} new, without the cache {r.nocache_headline_new_tokens} "
        "(end to end)",
        f"  gpt2jax cache    {fp32.tok_s:8.1f} tok/s "
        f"({100 * fp32.tok_s / r.bound_tok_s():.0f}% of the bound, "
        f"compile {fp32.compile_s:.1f} s)",
        f"  gpt2jax no cache {nocache.tok_s:8.1f} tok/s (compile {nocache.compile_s:.1f} s)",
        *(f"  gpt2jax {tag:<8} {q.tok_s:8.1f} tok/s ({q.tok_s / fp32.tok_s:.2f}x float32; "
          f"{r.weight_bytes[tag].total / 1e6:.0f} MB, bound {r.bound_tok_s(tag):.0f} tok/s; "
          f"greedy tokens equal to float32's: {100 * q.greedy_match:.0f}%)"
          for tag in INT8 for q in [r.figure(weights=tag)]),
        *(f"  gpt2jax {tag:<8} {t.tok_s:8.1f} tok/s ({t.tok_s / fp32.tok_s:.2f}x float32 "
          f"cache; greedy tokens equal to float32's: {100 * t.greedy_match:.0f}%)"
          for tag in TURBOQUANT for t in [r.figure(cache=tag)]),
        f"  HF cache         {hf_cache.tok_s:8.1f} tok/s",
        f"  torch loop cache {torch_loop.tok_s:8.1f} tok/s",
        f"  HF no cache      {hf_nocache.tok_s:8.1f} tok/s",
        f"  gpt2jax / HF (cache) {fp32.tok_s / hf_cache.tok_s:.2f}x, / torch loop "
        f"{fp32.tok_s / torch_loop.tok_s:.2f}x; cache speed-up: gpt2jax "
        f"{fp32.tok_s / nocache.tok_s:.1f}x, HF {hf_cache.tok_s / hf_nocache.tok_s:.1f}x; "
        f"greedy tokens equal to HF's: {100 * hf_cache.greedy_match:.0f}%",
    ]
    for B in r.batches[1:]:
        lines.append(
            f"  batch {B}: gpt2jax {r.figure(batch=B).tok_s:.1f} tok/s, "
            + ", ".join(f"{tag} {ratio:.2f}x" for tag, ratio in r.int8_ratios(B).items())
            + f"; HF {r.figure('hf', batch=B).tok_s:.1f}, torch loop "
            f"{r.figure('torch_loop', batch=B).tok_s:.1f}")
    lines += [
        *(f"KV cache bytes, {what}: " + ", ".join(
            f"{name} {n:,} ({n / sizes['float32']:.3f})" for name, n in sizes.items())
          for sizes, what in ((r.kv_bytes_headline, f"batch 1 x {P + N} tokens"),
                              (r.kv_bytes_longest, f"batch 1 x {r.lengths[-1]} tokens"))),
        "",
        "decode tok/s at total length (cache: the second half, prefill excluded; no cache: "
        "the last 4 tokens)",
        "| batch | length | gpt2jax cache | gpt2jax no cache | cache speed-up | HF cache | "
        "HF no cache | HF speed-up | gpt2jax / HF | compile s | KV MB (arrays) | formula MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ours in (f for f in r.sweep if (f.side, f.cache) == ("gpt2jax", "float32")):
        B, L = ours.batch, ours.length
        theirs = r.cell("hf", batch=B, length=L)
        recompute = (f"{r.cell(cache=NO_CACHE, batch=B, length=L).tok_s:.2f} | "
                     f"{r.speedup('gpt2jax', B, L):.1f}x | {theirs.tok_s:.1f} | "
                     f"{r.cell('hf', cache=NO_CACHE, batch=B, length=L).tok_s:.2f} | "
                     f"{r.speedup('hf', B, L):.1f}x"
                     if r.recomputed(B, L) else f"- | - | {theirs.tok_s:.1f} | - | -")
        size = r.cache_bytes(B, L)
        lines.append(
            f"| {B} | {L} | {ours.tok_s:.1f} | {recompute} | {ours.tok_s / theirs.tok_s:.2f}x | "
            f"{ours.compile_s:.1f} | {size.arrays / 1e6:.1f} | {size.formula / 1e6:.1f} |")
    for tq3 in (f for f in r.sweep if f.cache == "tq3"):
        B, L = tq3.batch, tq3.length
        lines.append(f"3-bit TurboQuant cache, batch {B}, length {L}: {tq3.tok_s:.1f} tok/s "
                     f"({tq3.tok_s / r.cell(batch=B, length=L).tok_s:.2f}x float32 cache, "
                     f"compile {tq3.compile_s:.1f} s)")
    return "\n".join(lines)


def readme_table(r: DecodeResult) -> str:
    """docs/results.md's decode table, every figure from this record."""
    first, L = r.lengths[0], r.lengths[-1]
    fp32, hf_cache, torch_loop = r.figure(), r.figure("hf"), r.figure("torch_loop")
    rows = [
        ("batch-1 decode, cache", f"{fp32.tok_s:.1f} tok/s "
         f"({100 * fp32.tok_s / r.bound_tok_s():.0f}% of the {r.bound_tok_s():.0f} tok/s "
         f"bandwidth bound)", f"HF generate {hf_cache.tok_s:.1f} "
         f"({fp32.tok_s / hf_cache.tok_s:.2f}x); "
         f"bare torch loop, static cache {torch_loop.tok_s:.1f} "
         f"({fp32.tok_s / torch_loop.tok_s:.2f}x)"),
        ("cache vs recompute, batch 1", f"{r.speedup('gpt2jax', 1, first):.1f}x ({first} "
         f"tokens) to {r.speedup('gpt2jax', 1, L):.1f}x ({L})",
         f"HF {r.speedup('hf', 1, first):.1f}x to {r.speedup('hf', 1, L):.1f}x"),
    ]
    for B in r.batches:
        speeds = ", ".join(f"{tag} {r.figure(weights=tag, batch=B).tok_s:.1f} tok/s"
                           for tag in INT8)
        mode, ratio = r.best_int8(B)
        rows.append((f"int8 decode, batch {B}", f"best ({mode}) {ratio:.2f}x float32", speeds))
    emb, fp32_bytes = r.weight_bytes["w8a8_emb"].total, r.weight_bytes["float32"].total
    rows.append(("int8 size, w8a8 + embeddings", f"{emb:,} bytes "
                 f"({emb / fp32_bytes:.3f}x float32)", f"float32 {fp32_bytes:,} bytes"))
    for B in r.batches:
        tq3 = r.cell(cache="tq3", batch=B, length=L).tok_s / r.cell(batch=B, length=L).tok_s
        rows.append((f"TurboQuant 3-bit cache, batch {B}, {L} tokens",
                     f"{tq3:.2f}x float32 cache", "float32 cache"))
    head = (f"{r.preset}, {_host(r)}, jax {r.jax}, torch {r.torch}; median of "
            f"{r.rounds} calls per cell (`python -m eval.bench_decode`)\n\n"
            "| measure | gpt2jax | reference |\n|---|---|---|\n")
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


def plot(r: DecodeResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = r.batches
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), sharey=True)
    styles = {("gpt2jax", "float32"): "C0-o", ("gpt2jax", NO_CACHE): "C0--o",
              ("hf", "float32"): "C1-s", ("hf", NO_CACHE): "C1--s"}
    for ax, B in zip(np.atleast_1d(axes), batches, strict=True):
        for (side, cache), style in styles.items():
            pts = sorted((f.length, f.tok_s) for f in r.sweep
                         if (f.side, f.cache, f.batch) == (side, cache, B))
            label = f"{'gpt2jax' if side == 'gpt2jax' else 'HF transformers'} " \
                    f"{'no cache' if cache == NO_CACHE else 'KV cache'}"
            ax.plot(*zip(*pts, strict=True), style, label=label)
        if B == 1:
            ax.axhline(r.bound_tok_s(), color="gray", ls=":",
                       label="bandwidth bound (weights / DRAM GB/s)")
        ax.set(xscale="log", yscale="log", xlabel="total length (tokens)",
               title=f"{r.preset}, batch {B}")
        ax.set_xticks([f.length for f in r.sweep if f.batch == B])
        ax.set_xticklabels([str(f.length) for f in r.sweep if f.batch == B])
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel("decode tokens / s")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    common.save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="model shape (default gpt2; baby with --quick)")
    parser.add_argument("--json", type=Path, help="default eval/results/bench_decode[_quick].json")
    parser.add_argument("--png", type=Path, help="default: the JSON path with .png")
    parser.add_argument("--quick", action="store_true", help="smoke run: baby preset, length 64")
    parser.add_argument("--ckpt", help="a checkpoint's weights instead of random ones (an "
                        "int8 one is dequantized for the float32 side)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"sweep lengths (default {' '.join(map(str, LENGTHS))})")
    parser.add_argument("--readme", action="store_true",
                        help="write docs/results.md's decode table from the JSON "
                        "(no benchmark run)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    preset = args.preset or ("baby" if args.quick else "gpt2")
    json_path = args.json or RESULTS / f"bench_decode{'_quick' if args.quick else ''}.json"
    png_path = args.png or json_path.with_suffix(".png")

    if args.readme:
        common.write_readme_block("bench_decode",
                                  readme_table(common.read_record(json_path, DecodeResult)),
                                  common.RESULTS_DOC)
        print(f"wrote {common.RESULTS_DOC.relative_to(common.ROOT)}'s decode table "
              f"from {json_path}")
        return 0
    results = run(preset, args.quick, args.ckpt, args.lengths,
                  command=common.command_line("eval.bench_decode", argv))
    print(format_table(results))
    common.write_record(json_path, results)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
