"""Decode speed of the float32 cache against TurboQuant caches (issue 14's check; the lead's
`eval.bench_decode` carries the official figures).

    python -m eval.bench_kvcache [--preset gpt2] [--batches 1 8] [--prompt 512] [--new 512]
                                 [--rounds 3] [--json eval/results/bench_kvcache.json]

Random-init model of the preset's shape, greedy `generate` continuing a random prompt; per
batch size and cache: decode tokens/s = B * (new - 1) / (best full call - best 1-token call),
the calls of the caches taking turns so a busy spell of the shared cores hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from eval.common import RESULTS, machine, write_json
from gpt2jax.config import GPTConfig
from gpt2jax.generate import generate
from gpt2jax.model import init_params
from gpt2jax.quant.turboquant import TurboQuantConfig

CACHES = {"fp32": "float32", "tq3": TurboQuantConfig(bits=3),
          "tq4prod": TurboQuantConfig(bits=4, key_quantizer="prod")}


def _seconds(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def run(preset: str, batches, prompt: int, new: int, rounds: int, caches) -> dict:
    config = GPTConfig.preset(preset)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    out = {"preset": preset, "prompt": prompt, "new_tokens": new, "rounds": rounds,
           "machine": machine(), "jax": jax.__version__, "load_average_start": os.getloadavg()}
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
            out[f"{name}_tok_s_b{B}_L{prompt + new}"] = B * (new - 1) / decode_s
        for name in caches:
            if name != "fp32":
                out[f"{name}_over_fp32_b{B}_L{prompt + new}"] = (
                    out[f"{name}_tok_s_b{B}_L{prompt + new}"]
                    / out[f"fp32_tok_s_b{B}_L{prompt + new}"])
        print(json.dumps(out, indent=1), flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser("python -m eval.bench_kvcache", description=__doc__)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--caches", nargs="+", default=["fp32", "tq3"], choices=list(CACHES))
    p.add_argument("--json", type=Path, default=RESULTS / "bench_kvcache.json")
    args = p.parse_args(argv)
    result = run(args.preset, args.batches, args.prompt, args.new, args.rounds, args.caches)
    result["load_average_end"] = os.getloadavg()
    print(f"wrote {write_json(args.json, result)}")


if __name__ == "__main__":
    main()
