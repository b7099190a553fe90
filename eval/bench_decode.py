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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
TURBOQUANT = {"tq3": TurboQuantConfig(bits=3),  # headline sides gpt2jax_<tag>
              "tq4prod": TurboQuantConfig(bits=4, key_quantizer="prod")}


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 8) -> dict:
    """Best DRAM read GB/s of a jitted sum and of a matrix-vector product over `nbytes`."""
    rows = nbytes // (4 * 1024)
    a = jnp.ones((rows, 1024), jnp.float32)
    x = jnp.ones((1024,), jnp.float32)
    out = {}
    for name, fn, args in (("sum", jax.jit(jnp.sum), (a,)),
                           ("matvec", jax.jit(jnp.dot), (a, x))):
        fn(*args).block_until_ready()
        best = min(_seconds(lambda fn=fn, args=args: fn(*args).block_until_ready())
                   for _ in range(repeats))
        out[f"{name}_GBps"] = a.nbytes / best / 1e9
    out["GBps"] = max(out.values())
    return out


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Ours:
    compiles = True

    def __init__(self, config: GPTConfig, params, name: str = "gpt2jax", kv_cache=None):
        self.config, self.params = config, params
        self.name, self.kv_cache = name, kv_cache

    def __call__(self, prompts: np.ndarray, new: int, cache: bool) -> np.ndarray:
        out = generate(self.params, self.config, prompts.tolist(), max_new_tokens=new,
                       key=jax.random.key(0), temperature=0.0, use_cache=cache,
                       kv_cache=self.kv_cache)
        return np.asarray(out)


class HuggingFace:
    name, compiles = "hf", False

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

    name = "torch_loop"

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
        raise RuntimeError(f"{side.name} returned {out.shape}, expected {(prompts.shape[0], new)}")
    return seconds, out


def timed(sides, prompts, new: int, cache: bool, rounds: int) -> dict:
    """{side name: (compile s, median steady s, tokens [B, new])} over `rounds` calls each.

    Every side gets one untimed warm-up call first; then the sides take turns, so a busy
    spell of the shared cores hits all alike, and the median call counts. A side that
    compiles: its warm-up call's excess over the median is the compile time."""
    first = {s.name: _call(s, prompts, new, cache)[0] for s in sides}
    times, outs = {s.name: [] for s in sides}, {}
    for _ in range(rounds):
        for s in sides:
            seconds, outs[s.name] = _call(s, prompts, new, cache)
            times[s.name].append(seconds)
    compiles = {s.name for s in sides if s.compiles}
    return {name: (max(first[name] - statistics.median(ts), 0.0) if name in compiles else 0.0,
                   statistics.median(ts), outs[name]) for name, ts in times.items()}


def measure(sides, prompts: np.ndarray, cache: bool, new: int, rounds: int) -> list[dict]:
    """One row per side: decode tokens/s continuing `prompts` [B, P] by `new` tokens."""
    B = prompts.shape[0]
    full = timed(sides, prompts, new, cache, rounds)
    if cache:  # subtract the prefill: a 1-token call on the same prompt
        prefill = timed(sides, prompts, 1, cache, rounds)
    rows = []
    for name, (compile_s, steady, _) in full.items():
        row = {"impl": name, "cache": cache, "batch": B, "length": prompts.shape[1] + new,
               "new_tokens": new, "steady_s": steady, "compile_s": compile_s}
        if cache:
            row["prefill_s"] = prefill[name][1]
            decode_s = steady - row["prefill_s"]  # NaN, not a wild number, if noise wins
            row["tok_s"] = B * (new - 1) / decode_s if decode_s > 0 else float("nan")
        else:  # each token is one full forward, the first one included
            row["tok_s"] = B * new / steady
        rows.append(row)
    return rows


def int8_variants(params) -> dict:
    """The int8 sides: {tag: quantized params} (SmoothQuant changes quality, not speed)."""
    return {tag: int8.quantize(params, **kwargs) for tag, kwargs in INT8.items()}


def run(preset: str, quick: bool, ckpt: str | None = None, lengths=None) -> dict:
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
    wpe_bytes = params["wpe"]["embedding"].nbytes if "wpe" in params else 0
    weight_bytes = int8.nbytes(params) - wpe_bytes  # a step reads one row of wpe
    results = {
        "preset": ckpt or preset, "quick": quick, "batches": list(batches),
        "machine": common.machine(), "threads": threads,
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "rounds": rounds,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_start": os.getloadavg(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "weight_bytes_per_step": weight_bytes,
        "float32_bytes": int8.nbytes(params),
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(config, params, tmp)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    hf_sides = (HuggingFace(model), TorchLoop(model))
    ours = Ours(config, params)
    quantized = int8_variants(params)
    int8_sides = tuple(Ours(config, q, f"gpt2jax_{tag}") for tag, q in quantized.items())
    for tag, q in quantized.items():
        results[f"{tag}_bytes"] = int8.nbytes(q)
        results[f"{tag}_weight_bytes_per_step"] = int8.nbytes(q) - wpe_bytes
    tq_sides = {tag: Ours(config, params, f"gpt2jax_{tag}", tq) for tag, tq in TURBOQUANT.items()}

    P, N = QUICK_HEADLINE if quick else HEADLINE
    results.update(headline_prompt=P, headline_new_tokens=N,
                   nocache_headline_new_tokens=min(N, NOCACHE_HEADLINE_NEW), lengths=lengths)
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

    rows, tokens = [], {}
    for kind, job_sides, prompts, cache, new in tqdm(jobs, desc="decode benchmark",
                                                     unit="cell"):
        if kind == "sweep":
            rows += measure(job_sides, prompts, cache, new, rounds)
            continue
        # the headline is end to end: new tokens / wall seconds of the whole generate call
        B = prompts.shape[0]
        suffix = ("cache" if cache else "nocache") + ("" if B == 1 else f"_b{B}")
        for name, (compile_s, steady, out) in timed(job_sides, prompts, new, cache,
                                                    rounds).items():
            results[f"{name}_{suffix}_tok_s"] = B * new / steady
            results[f"{name}_{suffix}_compile_s"] = compile_s
            tokens[(name, suffix)] = out
    for row in rows:
        if row["impl"] == "gpt2jax" and row["cache"]:
            B, L = row["batch"], row["length"]
            row["kv_cache_bytes"] = init_cache(config, B, L).nbytes - 4 * B  # minus lengths
            row["kv_formula_bytes"] = 2 * config.n_layer * B * L * config.n_embd * 4
    results["rows"] = rows
    kinds = {"float32": "float32", "float16": "float16", **TURBOQUANT}
    for key, B, L in (("kv_bytes_headline", 1, P + N), ("kv_bytes_longest", 1, lengths[-1])):
        results[key] = {name: make_cache(config, B, L, kind).nbytes
                        for name, kind in kinds.items()}
    results["kv_bytes_longest_length"] = lengths[-1]
    results["load_average_end"] = os.getloadavg()
    # measured before and after the sweep: the better is what the machine can do
    end = measure_read_bandwidth(**probe)
    results["bandwidth"] = {k: max(v, end[k]) for k, v in bandwidth.items()}
    results["bound_tok_s_batch1"] = results["bandwidth"]["GBps"] * 1e9 / weight_bytes
    for tag in INT8:
        results[f"{tag}_bound_tok_s_batch1"] = (results["bandwidth"]["GBps"] * 1e9
                                                / results[f"{tag}_weight_bytes_per_step"])
    summarize(results, tokens, lengths, batches)
    return results


def best_int8(results: dict, tail: str) -> None:
    """`int8_over_fp32_cache{tail}`: the fastest int8 mode over float32, from the tok/s of one
    run. Written after the per-mode ratios: weight-only int8's own is `int8_over_fp32_...`
    too, and the best must win."""
    fp32 = results[f"gpt2jax_cache{tail}_tok_s"]
    ratios = {tag: results[f"gpt2jax_{tag}_cache{tail}_tok_s"] / fp32 for tag in INT8}
    results[f"int8_best_mode{tail}"] = max(ratios, key=ratios.get)
    results[f"int8_over_fp32_cache{tail}"] = max(ratios.values())
    results[f"int8_weights_over_fp32_cache{tail}"] = ratios["int8"]


def summarize(results: dict, tokens: dict, lengths, batches) -> None:
    """The ratios the README and the report quote, each from sides of the same run."""
    fp32 = results["gpt2jax_cache_tok_s"]
    match = lambda a, b, suffix="cache": float(np.mean(tokens[(a, suffix)] == tokens[(b, suffix)]))
    results.update({
        "gpt2jax_over_hf_cache": fp32 / results["hf_cache_tok_s"],
        "gpt2jax_over_torch_loop_cache": fp32 / results["torch_loop_cache_tok_s"],
        "torch_loop_over_hf_cache": results["torch_loop_cache_tok_s"] / results["hf_cache_tok_s"],
        "gpt2jax_cache_over_nocache": fp32 / results["gpt2jax_nocache_tok_s"],
        "hf_cache_over_nocache": results["hf_cache_tok_s"] / results["hf_nocache_tok_s"],
        "bound_fraction": fp32 / results["bound_tok_s_batch1"],
        "greedy_tokens_match_hf": match("gpt2jax", "hf"),
        "greedy_tokens_match_torch_loop": match("gpt2jax", "torch_loop"),
    })
    for suffix in ("cache", *(f"cache_b{B}" for B in batches if B != 1)):
        ratios = {tag: results[f"gpt2jax_{tag}_{suffix}_tok_s"]
                  / results[f"gpt2jax_{suffix}_tok_s"] for tag in INT8}
        tail = suffix.removeprefix("cache")
        for tag, ratio in ratios.items():
            results[f"{tag}_over_fp32_{suffix}"] = ratio
            results[f"{tag}_greedy_tokens_match_fp32{tail}"] = match(f"gpt2jax_{tag}", "gpt2jax",
                                                                   suffix)
        best_int8(results, tail)
    results["int8_emb_bytes_over_fp32"] = results["w8a8_emb_bytes"] / results["float32_bytes"]
    for tag in TURBOQUANT:
        results[f"{tag}_over_fp32_cache"] = results[f"gpt2jax_{tag}_cache_tok_s"] / fp32
        # random weights: logits near-tied, so one flipped token shifts the rest; indicative
        results[f"{tag}_greedy_tokens_match_fp32"] = match(f"gpt2jax_{tag}", "gpt2jax")
    L = lengths[-1]
    for B in batches:
        long_rate = {r["impl"]: r["tok_s"] for r in results["rows"]
                     if r["cache"] and r["batch"] == B and r["length"] == L}
        results[f"tq3_over_fp32_b{B}_L{L}"] = long_rate["gpt2jax_tq3"] / long_rate["gpt2jax"]
        for length in lengths:
            rate = {(r["impl"], r["cache"]): r["tok_s"] for r in results["rows"]
                    if r["batch"] == B and r["length"] == length}
            results[f"over_hf_b{B}_L{length}"] = rate[("gpt2jax", True)] / rate[("hf", True)]
            if ("gpt2jax", False) in rate:
                results[f"speedup_b{B}_L{length}"] = (rate[("gpt2jax", True)]
                                                      / rate[("gpt2jax", False)])
                results[f"hf_speedup_b{B}_L{length}"] = rate[("hf", True)] / rate[("hf", False)]


def _host(r: dict) -> str:
    m = r["machine"]
    return f"{m['cpu']}, {m['cores']} cores ({m['sched']})"


def format_table(r: dict) -> str:
    P, N = r["headline_prompt"], r["headline_new_tokens"]
    bw = r["bandwidth"]
    load = "/".join(f"{x:.1f}" for x in (r["load_average_start"][0], r["load_average_end"][0]))
    lines = [
        f"{r['preset']} | {_host(r)} (load average start/end {load}) | jax {r['jax']}, "
        f"torch {r['torch']} | median of {r['rounds']} calls per cell",
        f"read bandwidth {bw['GBps']:.1f} GB/s (sum {bw['sum_GBps']:.1f}, matvec "
        f"{bw['matvec_GBps']:.1f}); weights read per step {r['weight_bytes_per_step'] / 1e6:.0f}"
        f" MB -> batch-1 bound {r['bound_tok_s_batch1']:.1f} tok/s",
        "",
        f"headline: prompt {P} + {N} new, without the cache {r['nocache_headline_new_tokens']} "
        "(end to end)",
        f"  gpt2jax cache    {r['gpt2jax_cache_tok_s']:8.1f} tok/s "
        f"({100 * r['bound_fraction']:.0f}% of the bound, "
        f"compile {r['gpt2jax_cache_compile_s']:.1f} s)",
        f"  gpt2jax no cache {r['gpt2jax_nocache_tok_s']:8.1f} tok/s "
        f"(compile {r['gpt2jax_nocache_compile_s']:.1f} s)",
        *(f"  gpt2jax {tag:<8} {r[f'gpt2jax_{tag}_cache_tok_s']:8.1f} tok/s "
          f"({r[f'gpt2jax_{tag}_cache_tok_s'] / r['gpt2jax_cache_tok_s']:.2f}x float32; "
          f"{r[f'{tag}_bytes'] / 1e6:.0f} MB, "
          f"bound {r[f'{tag}_bound_tok_s_batch1']:.0f} tok/s; greedy tokens equal to "
          f"float32's: {100 * r[f'{tag}_greedy_tokens_match_fp32']:.0f}%)" for tag in INT8),
        *(f"  gpt2jax {tag:<8} {r[f'gpt2jax_{tag}_cache_tok_s']:8.1f} tok/s "
          f"({r[f'{tag}_over_fp32_cache']:.2f}x float32 cache; greedy tokens equal to "
          f"float32's: {100 * r[f'{tag}_greedy_tokens_match_fp32']:.0f}%)"
          for tag in TURBOQUANT),
        f"  HF cache         {r['hf_cache_tok_s']:8.1f} tok/s",
        f"  torch loop cache {r['torch_loop_cache_tok_s']:8.1f} tok/s",
        f"  HF no cache      {r['hf_nocache_tok_s']:8.1f} tok/s",
        f"  gpt2jax / HF (cache) {r['gpt2jax_over_hf_cache']:.2f}x, / torch loop "
        f"{r['gpt2jax_over_torch_loop_cache']:.2f}x; cache speed-up: gpt2jax "
        f"{r['gpt2jax_cache_over_nocache']:.1f}x, HF {r['hf_cache_over_nocache']:.1f}x; "
        f"greedy tokens equal to HF's: {100 * r['greedy_tokens_match_hf']:.0f}%",
    ]
    for B in r["batches"][1:]:
        lines.append(
            f"  batch {B}: gpt2jax {r[f'gpt2jax_cache_b{B}_tok_s']:.1f} tok/s, "
            + ", ".join(f"{tag} {r[f'gpt2jax_{tag}_cache_b{B}_tok_s'] / fp32:.2f}x"
                        for tag in INT8 for fp32 in [r[f"gpt2jax_cache_b{B}_tok_s"]])
            + f"; HF {r[f'hf_cache_b{B}_tok_s']:.1f}, torch loop "
            f"{r[f'torch_loop_cache_b{B}_tok_s']:.1f}")
    lines += [
        *(f"KV cache bytes, {what}: " + ", ".join(
            f"{name} {n:,} ({n / r[key]['float32']:.3f})" for name, n in r[key].items())
          for key, what in (("kv_bytes_headline", f"batch 1 x {P + N} tokens"),
                            ("kv_bytes_longest",
                             f"batch 1 x {r['kv_bytes_longest_length']} tokens"))),
        "",
        "decode tok/s at total length (cache: the second half, prefill excluded; no cache: "
        "the last 4 tokens)",
        "| batch | length | gpt2jax cache | gpt2jax no cache | cache speed-up | HF cache | "
        "HF no cache | HF speed-up | gpt2jax / HF | compile s | KV MB (arrays) | formula MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(x["impl"], x["cache"], x["batch"], x["length"]): x for x in r["rows"]}
    for (impl, cache, B, L), ours in by_key.items():
        if impl != "gpt2jax" or not cache:
            continue
        recompute = (f"{by_key[('gpt2jax', False, B, L)]['tok_s']:.2f} | "
                     f"{r[f'speedup_b{B}_L{L}']:.1f}x | {by_key[('hf', True, B, L)]['tok_s']:.1f}"
                     f" | {by_key[('hf', False, B, L)]['tok_s']:.2f} | "
                     f"{r[f'hf_speedup_b{B}_L{L}']:.1f}x"
                     if ("gpt2jax", False, B, L) in by_key else
                     f"- | - | {by_key[('hf', True, B, L)]['tok_s']:.1f} | - | -")
        lines.append(
            f"| {B} | {L} | {ours['tok_s']:.1f} | {recompute} | {r[f'over_hf_b{B}_L{L}']:.2f}x | "
            f"{ours['compile_s']:.1f} | {ours['kv_cache_bytes'] / 1e6:.1f} | "
            f"{ours['kv_formula_bytes'] / 1e6:.1f} |")
    for tq3 in (x for x in r["rows"] if x["impl"] == "gpt2jax_tq3"):
        B, L = tq3["batch"], tq3["length"]
        lines.append(f"3-bit TurboQuant cache, batch {B}, length {L}: {tq3['tok_s']:.1f} tok/s "
                     f"({r[f'tq3_over_fp32_b{B}_L{L}']:.2f}x float32 cache, compile "
                     f"{tq3['compile_s']:.1f} s)")
    return "\n".join(lines)


def readme_table(r: dict) -> str:
    """docs/results.md's decode table, every figure from this JSON."""
    L = r["kv_bytes_longest_length"]
    rows = [
        ("batch-1 decode, cache", f"{r['gpt2jax_cache_tok_s']:.1f} tok/s "
         f"({100 * r['bound_fraction']:.0f}% of the {r['bound_tok_s_batch1']:.0f} tok/s bandwidth "
         f"bound)", f"HF generate {r['hf_cache_tok_s']:.1f} ({r['gpt2jax_over_hf_cache']:.2f}x); "
         f"bare torch loop, static cache {r['torch_loop_cache_tok_s']:.1f} "
         f"({r['gpt2jax_over_torch_loop_cache']:.2f}x)"),
        ("cache vs recompute, batch 1", f"{r['speedup_b1_L64']:.1f}x (64 tokens) to "
         f"{r[f'speedup_b1_L{L}']:.1f}x ({L})",
         f"HF {r['hf_speedup_b1_L64']:.1f}x to {r[f'hf_speedup_b1_L{L}']:.1f}x"),
    ]
    for tail, what in (("", "batch 1"), *((f"_b{B}", f"batch {B}") for B in r["batches"][1:])):
        ratios = ", ".join(f"{tag} {r[f'gpt2jax_{tag}_cache{tail}_tok_s']:.1f} tok/s"
                           for tag in INT8)
        rows.append((f"int8 decode, {what}", f"best ({r[f'int8_best_mode{tail}']}) "
                     f"{r[f'int8_over_fp32_cache{tail}']:.2f}x float32", ratios))
    rows.append(("int8 size, w8a8 + embeddings", f"{r['w8a8_emb_bytes']:,} bytes "
                 f"({r['int8_emb_bytes_over_fp32']:.3f}x float32)", "float32 "
                 f"{r['float32_bytes']:,} bytes"))
    for B in r["batches"]:
        key = f"tq3_over_fp32_b{B}_L{L}"
        rows.append((f"TurboQuant 3-bit cache, batch {B}, {L} tokens",
                     f"{r[key]:.2f}x float32 cache", "float32 cache"))
    head = (f"{r['preset']}, {_host(r)}, jax {r['jax']}, torch {r['torch']}; median of "
            f"{r['rounds']} calls per cell (`python -m eval.bench_decode`)\n\n"
            "| measure | gpt2jax | reference |\n|---|---|---|\n")
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = r["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), sharey=True)
    styles = {("gpt2jax", True): "C0-o", ("gpt2jax", False): "C0--o",
              ("hf", True): "C1-s", ("hf", False): "C1--s"}
    for ax, B in zip(np.atleast_1d(axes), batches, strict=True):
        for (impl, cache), style in styles.items():
            pts = sorted((x["length"], x["tok_s"]) for x in r["rows"]
                         if (x["impl"], x["cache"], x["batch"]) == (impl, cache, B))
            label = f"{'gpt2jax' if impl == 'gpt2jax' else 'HF transformers'} " \
                    f"{'KV cache' if cache else 'no cache'}"
            ax.plot(*zip(*pts, strict=True), style, label=label)
        if B == 1:
            ax.axhline(r["bound_tok_s_batch1"], color="gray", ls=":",
                       label="bandwidth bound (weights / DRAM GB/s)")
        ax.set(xscale="log", yscale="log", xlabel="total length (tokens)",
               title=f"{r['preset']}, batch {B}")
        ax.set_xticks([x["length"] for x in r["rows"] if x["batch"] == B])
        ax.set_xticklabels([str(x["length"]) for x in r["rows"] if x["batch"] == B])
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
    args = parser.parse_args(argv)
    preset = args.preset or ("baby" if args.quick else "gpt2")
    json_path = args.json or RESULTS / f"bench_decode{'_quick' if args.quick else ''}.json"
    png_path = args.png or json_path.with_suffix(".png")

    if args.readme:
        common.write_readme_block("bench_decode", readme_table(json.loads(json_path.read_text())),
                                  common.RESULTS_DOC)
        print(f"wrote {common.RESULTS_DOC.relative_to(common.ROOT)}'s decode table "
              f"from {json_path}")
        return 0
    results = run(preset, args.quick, args.ckpt, args.lengths)
    print(format_table(results))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
