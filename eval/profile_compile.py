"""Why the test suite sets the XLA flags it sets: compile seconds of the suite's typical programs.

    python -m eval.profile_compile [--rounds 3] [--json eval/results/profile_compile.json]

The suite compiles hundreds of tiny programs and runs each briefly, so its time is compile
time. For each flag set below, a fresh process (XLA reads XLA_FLAGS once, at start) times
three programs of a toy model (2 layers x 64, the GPT-2 vocabulary): lowering + compiling a
train step's gradient, and the first `generate` call (8 new tokens, its prefill and decode
programs) with a float32 cache and with a 3-bit TurboQuant cache. The flag sets take turns,
`--rounds` times, and the fastest round counts, so a busy spell of the shared cores hits
them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from eval import common

FLAG_SETS = {
    "XLA default": "",
    "-O0": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    "-O0, legacy fusion emitters": "--xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
}
PROGRAMS = ("train-step grad", "generate", "generate, TurboQuant 3-bit")


def child() -> dict:
    """{program: seconds} in this process, under its XLA_FLAGS."""
    import jax

    from gpt2jax.config import GPTConfig
    from gpt2jax.generation import generate
    from gpt2jax.model import init_params
    from gpt2jax.quant.turboquant import TurboQuantConfig
    from train.step import token_losses

    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)
    params = init_params(config, jax.random.key(0))
    x = jax.numpy.zeros((4, 32), jax.numpy.int32)
    grad = jax.jit(jax.grad(lambda p: token_losses(p, x, x, config).mean()))
    seconds = {}
    t = time.perf_counter()
    grad.lower(params).compile()
    seconds[PROGRAMS[0]] = time.perf_counter() - t
    for name, kind in zip(PROGRAMS[1:], ("float32", TurboQuantConfig(bits=3)), strict=True):
        t = time.perf_counter()
        generate(params, config, [[1, 2, 3]], max_new_tokens=8, key=jax.random.key(0),
                 temperature=0.0, kv_cache=kind).block_until_ready()
        seconds[name] = time.perf_counter() - t
    return seconds


def run(rounds: int) -> dict:
    best = {name: {} for name in FLAG_SETS}
    for _ in range(rounds):
        for name, flags in FLAG_SETS.items():
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_ENABLE_COMPILATION_CACHE": "false"}
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
            out = subprocess.run([sys.executable, "-m", "eval.profile_compile", "--child"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            for program, s in json.loads(out.splitlines()[-1]).items():
                best[name][program] = min(s, best[name].get(program, float("inf")))
    return {"machine": common.machine(), "rounds": rounds, "flags": FLAG_SETS,
            "seconds": best}


def table(result: dict) -> str:
    lines = ["| XLA flags | " + " | ".join(PROGRAMS) + " |",
             "|---|" + "---:|" * len(PROGRAMS)]
    for name, by in result["seconds"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by[p]:.2f} s" for p in PROGRAMS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser("python -m eval.profile_compile", description=__doc__.split(
        "\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="turns per flag set (the best counts)")
    p.add_argument("--json", type=Path, default=common.RESULTS / "profile_compile.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child()))
        return
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: need at least 1")
    result = run(args.rounds)
    common.write_json(args.json, result)
    print(f"{result['machine']['cpu']}\n{table(result)}\nwrote {args.json}")


if __name__ == "__main__":
    main()
