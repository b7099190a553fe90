"""Decode speed: gpt2jax.generate against Hugging Face transformers, with and without KV cache.

    python -m eval.bench_decode [--preset gpt2] [--json PATH] [--png PATH] [--quick]

One run, same random weights on both sides (exported with gpt2jax.hf.save and loaded by
GPT2LMHeadModel), same threads, greedy decoding:

- headline: batch 1, prompt 32 + 128 new tokens (--quick: 32 + 32), tokens/s of the whole
  generate call; with the cache also on int8 weights and with TurboQuant caches (3-bit mse
  keys `tq3`, 4-bit prod keys `tq4prod`), each against the float32 cache: speed ratio,
  share of greedy tokens equal to its (on random weights only indicative: near-tied logits
  flip), and the cache bytes of the headline shape and of batch 1 at the longest length;
- sweep: batch 1 and 8 at total lengths 64..1024. With the cache, the decode rate up to that
  length: a prompt of half of it, then the other half as new tokens, minus the same call
  with 1 new token (the prefill), so prefill time does not hide in it (with 32 new tokens
  after a long prompt, the noise of a busy machine on the prefill exceeded the decode); the
  3-bit TurboQuant cache too at batch 1 and the longest length.
  Without the cache every token costs one full forward over the sequence: 4 new tokens
  ending at that length;
- compile time (first call minus a steady one) apart from the steady-state time, which is
  the best of 2 calls with the cache (3 for the headline), 1 without, gpt2jax and HF taking
  turns (other processes may share the cores: the load average is recorded);
- KV-cache bytes from the arrays next to the formula 2 * n_layer * B * T * n_embd * bytes;
- the memory-bandwidth bound: a batch-1 decode step must read every weight once, so it
  cannot beat (measured DRAM read bandwidth) / (weight bytes).

--quick runs the `baby` preset at lengths 64 and 128, batch 1 only (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2jax import hf
from gpt2jax.config import PRESETS, GPTConfig
from gpt2jax.generate import generate
from gpt2jax.kvcache import init_cache, make_cache
from gpt2jax.model import init_params
from gpt2jax.quant import int8
from gpt2jax.quant.turboquant import TurboQuantConfig

# torch's OpenMP workers spin at every barrier; on cores shared with other processes that
# made HF 5-20x slower (baby, cache: 17.6 -> 83.5 tok/s, measured). Waiting passively is
# the generous setting for the baseline. Set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (64, 128, 256, 512, 1024)
QUICK_LENGTHS = (64, 128)
BATCHES = (1, 8)
HEADLINE, QUICK_HEADLINE = (32, 128), (32, 32)  # prompt tokens, new tokens
NOCACHE_NEW = 4
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
        self.config, self.params, self.name, self.kv_cache = config, params, name, kv_cache

    def __call__(self, prompts: np.ndarray, new: int, cache: bool) -> np.ndarray:
        out = generate(self.params, self.config, prompts.tolist(), max_new_tokens=new,
                       key=jax.random.key(0), temperature=0.0, use_cache=cache,
                       kv_cache=self.kv_cache)
        return np.asarray(out)


class HuggingFace:
    name, compiles = "hf", False

    def __init__(self, directory: Path):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()

    def __call__(self, prompts: np.ndarray, new: int, cache: bool) -> np.ndarray:
        ids = self.torch.from_numpy(prompts.astype(np.int64))
        with self.torch.inference_mode():  # min_new_tokens: a random model must not stop early
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                      do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                      use_cache=cache, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()


def _call(side, prompts, new: int, cache: bool):
    t = time.perf_counter()
    out = side(prompts, new, cache)
    seconds = time.perf_counter() - t
    if out.shape != (prompts.shape[0], new):
        raise RuntimeError(f"{side.name} returned {out.shape}, expected {(prompts.shape[0], new)}")
    return seconds, out


def timed(sides, prompts, new: int, cache: bool, rounds: int) -> dict:
    """{side name: (compile s, best steady s, tokens [B, new])} over `rounds` calls each.

    The sides take turns, so a busy spell of the shared cores hits both alike, and the best
    call counts. A side that compiles gets one call more first; its excess over the best
    steady call is the compile time."""
    first = {s.name: _call(s, prompts, new, cache)[0] for s in sides if s.compiles}
    times, outs = {s.name: [] for s in sides}, {}
    for _ in range(rounds):
        for s in sides:
            seconds, outs[s.name] = _call(s, prompts, new, cache)
            times[s.name].append(seconds)
    return {name: (max(first[name] - min(ts), 0.0) if name in first else 0.0, min(ts),
                   outs[name]) for name, ts in times.items()}


def measure(sides, prompts: np.ndarray, cache: bool, new: int) -> list[dict]:
    """One row per side: decode tokens/s continuing `prompts` [B, P] by `new` tokens."""
    B = prompts.shape[0]
    rounds = 2 if cache else 1
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


def run(preset: str, quick: bool) -> dict:
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # XLA's CPU client uses every core it is given
    config = GPTConfig.preset(preset)
    params = init_params(config, jax.random.key(0))
    lengths = [n for n in (QUICK_LENGTHS if quick else LENGTHS) if n <= config.block_size]
    batches = BATCHES[:1] if quick else BATCHES
    rng = np.random.default_rng(0)
    prompt = lambda B, P: rng.integers(0, config.vocab_size, (B, P))

    bandwidth = measure_read_bandwidth()
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    weight_bytes -= params["wpe"]["embedding"].nbytes  # a step reads one row of it
    results = {
        "preset": preset, "quick": quick, "batches": list(batches),
        "machine": f"{platform.processor() or platform.machine()}, {threads} threads",
        "jax": jax.__version__, "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_start": os.getloadavg(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "weight_bytes_per_step": weight_bytes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(config, params, tmp)
        sides = (Ours(config, params), HuggingFace(Path(tmp)))
    # claim 6's speed half: the same decode on int8 weights (headline, with cache)
    int8_params = int8.quantize(params)
    int8_side = Ours(config, int8_params, "gpt2jax_int8")
    int8_bytes = int8.nbytes(int8_params) - params["wpe"]["embedding"].nbytes
    tq_sides = {tag: Ours(config, params, f"gpt2jax_{tag}", tq) for tag, tq in TURBOQUANT.items()}

    P, N = QUICK_HEADLINE if quick else HEADLINE
    results.update(headline_prompt=P, headline_new_tokens=N)
    cached_sides = (*sides, int8_side, *tq_sides.values())
    jobs = [("headline", cached_sides if cache else sides, prompt(1, P), cache, N)
            for cache in (True, False)]
    for B in batches:
        for L in lengths:
            # the 3-bit cache where its reads weigh most, taking turns with the float one
            long = (B, L) == (1, lengths[-1])
            jobs += [("sweep", (*sides, tq_sides["tq3"]) if long else sides,
                      prompt(B, L // 2), True, L // 2),
                     ("sweep", sides, prompt(B, L - NOCACHE_NEW), False, NOCACHE_NEW)]

    rows, tokens = [], {}
    for kind, job_sides, prompts, cache, new in tqdm(jobs, desc="decode benchmark",
                                                     unit="point"):
        if kind == "sweep":
            rows += measure(job_sides, prompts, cache, new)
            continue
        # the headline is end to end: new tokens / wall seconds of the whole generate call
        suffix = "cache" if cache else "nocache"
        for name, (compile_s, steady, out) in timed(job_sides, prompts, new, cache,
                                                    rounds=3 if cache else 1).items():
            results[f"{name}_{suffix}_tok_s"] = new / steady
            results[f"{name}_{suffix}_compile_s"] = compile_s
            tokens[(name, cache)] = out
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
    end = measure_read_bandwidth()
    results["bandwidth"] = {k: max(v, end[k]) for k, v in bandwidth.items()}
    results["bound_tok_s_batch1"] = results["bandwidth"]["GBps"] * 1e9 / weight_bytes
    results["int8_weight_bytes_per_step"] = int8_bytes
    results["int8_bound_tok_s_batch1"] = results["bandwidth"]["GBps"] * 1e9 / int8_bytes

    ours, theirs = results["gpt2jax_cache_tok_s"], results["hf_cache_tok_s"]
    results.update({
        "gpt2jax_over_hf_cache": ours / theirs,
        "gpt2jax_cache_over_nocache": ours / results["gpt2jax_nocache_tok_s"],
        "hf_cache_over_nocache": theirs / results["hf_nocache_tok_s"],
        "bound_fraction": ours / results["bound_tok_s_batch1"],
        "int8_over_fp32_cache": results["gpt2jax_int8_cache_tok_s"] / ours,
        "int8_greedy_tokens_match_fp32": float(np.mean(
            tokens[("gpt2jax_int8", True)] == tokens[("gpt2jax", True)])),
        "greedy_tokens_match_hf": float(np.mean(
            tokens[("gpt2jax", True)] == tokens[("hf", True)])),
    })
    for tag in TURBOQUANT:
        results[f"{tag}_over_fp32_cache"] = results[f"gpt2jax_{tag}_cache_tok_s"] / ours
        # random weights: logits near-tied, so one flipped token shifts the rest; indicative
        results[f"{tag}_greedy_tokens_match_fp32"] = float(np.mean(
            tokens[(f"gpt2jax_{tag}", True)] == tokens[("gpt2jax", True)]))
    L = lengths[-1]
    long_rate = {r["impl"]: r["tok_s"] for r in rows
                 if r["cache"] and r["batch"] == 1 and r["length"] == L}
    results[f"tq3_over_fp32_b1_L{L}"] = long_rate["gpt2jax_tq3"] / long_rate["gpt2jax"]
    for B in batches:
        for L in lengths:
            rate = {(r["impl"], r["cache"]): r["tok_s"] for r in rows
                    if r["batch"] == B and r["length"] == L}
            results[f"speedup_b{B}_L{L}"] = rate[("gpt2jax", True)] / rate[("gpt2jax", False)]
            results[f"hf_speedup_b{B}_L{L}"] = rate[("hf", True)] / rate[("hf", False)]
            results[f"over_hf_b{B}_L{L}"] = rate[("gpt2jax", True)] / rate[("hf", True)]
    return results


def format_table(r: dict) -> str:
    P, N = r["headline_prompt"], r["headline_new_tokens"]
    bw = r["bandwidth"]
    load = "/".join(f"{x:.1f}" for x in (r["load_average_start"][0], r["load_average_end"][0]))
    lines = [
        f"{r['preset']} | {r['machine']} (load average start/end {load}) | jax {r['jax']}, "
        f"torch {r['torch']}",
        f"read bandwidth {bw['GBps']:.1f} GB/s (sum {bw['sum_GBps']:.1f}, matvec "
        f"{bw['matvec_GBps']:.1f}); weights read per step {r['weight_bytes_per_step'] / 1e6:.0f}"
        f" MB -> batch-1 bound {r['bound_tok_s_batch1']:.1f} tok/s",
        "",
        f"headline: batch 1, prompt {P} + {N} new (end to end)",
        f"  gpt2jax cache    {r['gpt2jax_cache_tok_s']:8.1f} tok/s "
        f"({100 * r['bound_fraction']:.0f}% of the bound, "
        f"compile {r['gpt2jax_cache_compile_s']:.1f} s)",
        f"  gpt2jax no cache {r['gpt2jax_nocache_tok_s']:8.1f} tok/s "
        f"(compile {r['gpt2jax_nocache_compile_s']:.1f} s)",
        f"  gpt2jax int8     {r['gpt2jax_int8_cache_tok_s']:8.1f} tok/s "
        f"({r['int8_over_fp32_cache']:.2f}x float32; int8 bound "
        f"{r['int8_bound_tok_s_batch1']:.1f} tok/s; greedy tokens equal to float32's: "
        f"{100 * r['int8_greedy_tokens_match_fp32']:.0f}%)",
        *(f"  gpt2jax {tag:<8} {r[f'gpt2jax_{tag}_cache_tok_s']:8.1f} tok/s "
          f"({r[f'{tag}_over_fp32_cache']:.2f}x float32 cache; greedy tokens equal to "
          f"float32's: {100 * r[f'{tag}_greedy_tokens_match_fp32']:.0f}%)"
          for tag in TURBOQUANT),
        f"  HF cache         {r['hf_cache_tok_s']:8.1f} tok/s",
        f"  HF no cache      {r['hf_nocache_tok_s']:8.1f} tok/s",
        f"  gpt2jax / HF (cache) {r['gpt2jax_over_hf_cache']:.2f}x; cache speed-up: gpt2jax "
        f"{r['gpt2jax_cache_over_nocache']:.1f}x, HF {r['hf_cache_over_nocache']:.1f}x; "
        f"greedy tokens equal to HF's: {100 * r['greedy_tokens_match_hf']:.0f}%",
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
        lines.append(
            f"| {B} | {L} | {ours['tok_s']:.1f} | {by_key[('gpt2jax', False, B, L)]['tok_s']:.2f} "
            f"| {r[f'speedup_b{B}_L{L}']:.1f}x | {by_key[('hf', True, B, L)]['tok_s']:.1f} | "
            f"{by_key[('hf', False, B, L)]['tok_s']:.2f} | {r[f'hf_speedup_b{B}_L{L}']:.1f}x | "
            f"{r[f'over_hf_b{B}_L{L}']:.2f}x | {ours['compile_s']:.1f} | "
            f"{ours['kv_cache_bytes'] / 1e6:.1f} | {ours['kv_formula_bytes'] / 1e6:.1f} |"
        )
    tq3 = next(x for x in r["rows"] if x["impl"] == "gpt2jax_tq3")
    L = tq3["length"]
    lines.append(f"3-bit TurboQuant cache, batch 1, length {L}: {tq3['tok_s']:.1f} tok/s "
                 f"({r[f'tq3_over_fp32_b1_L{L}']:.2f}x float32 cache, compile "
                 f"{tq3['compile_s']:.1f} s)")
    return "\n".join(lines)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="model shape (default gpt2; baby with --quick)")
    parser.add_argument("--json", type=Path, help="default eval/results/bench_decode[_quick].json")
    parser.add_argument("--png", type=Path, help="default: the JSON path with .png")
    parser.add_argument("--quick", action="store_true", help="baby preset, lengths 64 and 128")
    args = parser.parse_args(argv)
    preset = args.preset or ("baby" if args.quick else "gpt2")
    json_path = args.json or RESULTS / f"bench_decode{'_quick' if args.quick else ''}.json"
    png_path = args.png or json_path.with_suffix(".png")

    results = run(preset, args.quick)
    print(format_table(results))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
