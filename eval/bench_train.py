"""Training throughput: gpt2jax's jitted train step against Hugging Face GPT2LMHeadModel.

    python -m eval.bench_train [--json PATH] [--quick]

Same shapes, same threads, in one run: `baby` (6 x 384, batch 8 x 256) and the 124M
shape (12 x 768, batch 4 x 256), float32 and bfloat16. Both sides do a whole optimizer
step: forward, cross-entropy over the 50,257-way vocabulary, backward, global-norm clip at
1.0, AdamW with weight decay. Dropout is 0 on both sides (pure compute). MFU is against the
best measured float32 matmul FLOP/s of each framework on this machine, and against the
higher of the two (the machine's best).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from gpt2jax.config import GPTConfig
from gpt2jax.model import init_params
from train import optim, perf
from train import step as step_lib

SHAPES = {  # name -> (model preset, batch, seq)
    "baby": ("baby", 8, 256),
    "124m": ("gpt2", 4, 256),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _time_interleaved(runners: dict, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each blocking `runners[name]()`, the frameworks taking
    turns step by step so that load from other processes hits both alike."""
    for _ in range(warmup):
        for run_step in runners.values():
            run_step()
    times = {name: [] for name in runners}
    for _ in range(steps):
        for name, run_step in runners.items():
            t = time.perf_counter()
            run_step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def jax_runner(config: GPTConfig, batch: int, seq: int):
    """(run one train step and block, seconds the first step took: compile included)."""
    optimizer = optim.make_optimizer(weight_decay=0.1)
    state = step_lib.init_state(init_params(config, jax.random.PRNGKey(0)), optimizer, 0)
    train_step = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq + 1))
    x, y = (jax.device_put(a.astype(np.int32)) for a in (tokens[..., :-1], tokens[..., 1:]))

    def run_step():
        nonlocal state
        state, _ = train_step(state, x, y, np.float32(1e-4))
        jax.block_until_ready(state)  # the whole update, not just the loss

    return run_step, _timed(run_step)


def torch_runner(config: GPTConfig, batch: int, seq: int):
    """The same step with Hugging Face's GPT2LMHeadModel and torch.optim.AdamW."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hf_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    bf16 = config.dtype == "bfloat16"

    def run_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run_step, _timed(run_step)


def torch_peak_flops(n: int = 2048, repeats: int = 8) -> float:
    import torch

    a = torch.ones(n, n)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2.0 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(quick: bool = False) -> dict:
    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    warmup, steps = (1, 3) if quick else (2, 6)
    peaks = {"jax_fp32_flops": perf.measure_peak_flops("float32"),
             "torch_fp32_flops": torch_peak_flops()}
    peak = max(peaks.values())
    results = {"machine": f"{platform.processor() or platform.machine()}, {threads} threads",
               "jax": jax.__version__, "torch": torch.__version__, **peaks,
               "mfu_denominator_flops": peak, "dropout": 0.0}
    rows = []
    for shape, (preset, batch, seq) in SHAPES.items():
        for dname, dtype in DTYPES.items():
            config = GPTConfig.preset(preset, dtype=dtype)
            flops = perf.flops_per_token(config, seq)
            print(f"{shape} {dname} (batch {batch} x {seq}) ...", flush=True)
            runners = {"gpt2jax": jax_runner(config, batch, seq),
                       "torch": torch_runner(config, batch, seq)}
            step_s = _time_interleaved({k: r[0] for k, r in runners.items()}, warmup, steps)
            for side, own in (("gpt2jax", "jax_fp32_flops"), ("torch", "torch_fp32_flops")):
                tok_s = batch * seq / step_s[side]
                key = f"{side}_{shape}_{dname}"
                results[f"{key}_tok_s"] = tok_s
                results[f"{key}_mfu"] = tok_s * flops / peak
                results[f"{key}_mfu_own_peak"] = tok_s * flops / peaks[own]
                results[f"{key}_first_step_s"] = runners[side][1]
                rows.append((shape, dname, side, tok_s, tok_s * flops / peak,
                             tok_s * flops / peaks[own], runners[side][1]))
            results[f"ratio_{shape}_{dname}"] = step_s["torch"] / step_s["gpt2jax"]
            del runners
    results["rows"] = rows
    return results


def format_table(results: dict) -> str:
    lines = [
        f"peak fp32 matmul: jax {results['jax_fp32_flops'] / 1e9:.0f} GFLOP/s, torch "
        f"{results['torch_fp32_flops'] / 1e9:.0f} GFLOP/s ({results['machine']})",
        "| shape | dtype | framework | tokens/s | MFU (machine peak) | MFU (own peak) | "
        "first step s | gpt2jax / torch |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for shape, dname, side, tok_s, mfu, own, first in results["rows"]:
        ratio = f"{results[f'ratio_{shape}_{dname}']:.2f}x" if side == "gpt2jax" else ""
        lines.append(f"| {shape} | {dname} | {side} | {tok_s:.0f} | {mfu:.1%} | {own:.1%} | "
                     f"{first:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (smoke test)")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
