"""Where a decode step's time goes, float32 against int8: a jax.profiler trace of generate.

    python -m eval.profile_decode [--preset gpt2] [--batches 1 8] [--json PATH]

For each batch size and each weight format (float32, `int8` weights only, `w8a8` with `wte`
int8 too) traces one `generate` call (prompt 32 + 64 new tokens, cache) with XLA's per-op
trace events, joins every op to its compiled-HLO instruction and sums op time per decoded
token by what it is for: the layers' matmuls, the head, the Linear layers' elementwise work
(int8 -> float converts of the kernels, the activations' int8 rounding, the scale products,
the bias), attention, sampling, the rest.
"""

from __future__ import annotations

import os

# Per-op trace events must be switched on before XLA initializes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from eval import common  # noqa: E402
from eval.profile_step import hlo_instructions, op_times  # noqa: E402
from gpt2jax import generation as gen  # noqa: E402
from gpt2jax.config import PRESETS, GPTConfig  # noqa: E402
from gpt2jax.model import init_params  # noqa: E402
from gpt2jax.quant import int8  # noqa: E402

FORMATS = {"float32": None, "int8": dict(mode="weights"),
           "w8a8_emb": dict(mode="w8a8", embeddings=True)}
PROMPT, NEW = 32, 64
CATEGORIES = ("layer matmuls", "head matmul", "Linear elementwise", "attention", "sampling",
              "other")


def categorize(name: str, op_name: str, result: str, vocab_size: int) -> str:
    """The category of one op from its name, JAX source path and result type. XLA drops the
    source path of some dots it moves into the decode loop: their result shape tells."""
    is_dot = name.startswith(("dot", "ynn_fusion")) or "dot_general" in op_name
    if is_dot and not op_name:
        return "head matmul" if result.endswith(f",{vocab_size}]") else "layer matmuls"
    if any(f"/{m}/" in op_name for m in ("c_attn", "c_proj", "c_fc")):
        return "layer matmuls" if is_dot else "Linear elementwise"
    if "BTD,VD->BTV" in op_name or ("GPT/" in op_name and is_dot):
        return "head matmul"
    if "/attn/" in op_name:
        return "attention"
    if "GPT" not in op_name and op_name:
        return "sampling"
    return "other"


def profile(config: GPTConfig, params, B: int) -> dict:
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (B, PROMPT)).tolist()
    args = gen._setup(prompts, config, NEW, 0.0, None, None, None, True, None)
    tokens_BP, lengths_B, sampling, static, cache = args
    call = lambda: gen._generate(params, tokens_BP, lengths_B, jax.random.key(0), sampling,
                                 max_new_tokens=NEW, **static, **cache).block_until_ready()
    compiled = gen._generate.lower(params, tokens_BP, lengths_B, jax.random.key(0), sampling,
                                   max_new_tokens=NEW, **static, **cache).compile()
    hlo = compiled.as_text()
    instructions = hlo_instructions(hlo)
    results = dict(re.findall(r"%([\w.-]+) = (\w+\[[\d,]*\])", hlo))
    call()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            call()
        times = op_times(Path(trace_dir), instructions)
    by_category = collections.Counter()
    for name, us in times.items():
        by_category[categorize(*instructions[name], results.get(name, ""),
                               config.vocab_size)] += us
    per_token = {k: by_category[k] / 1e3 / NEW for k in CATEGORIES}  # ms per decode step
    return {"ms_per_step": per_token, "traced_ms_per_step": sum(per_token.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.profile_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="gpt2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", type=Path, default=common.RESULTS / "profile_decode.json")
    args = p.parse_args(argv)
    config = GPTConfig.preset(args.preset)
    float_params = init_params(config, jax.random.key(0))
    result = {"preset": args.preset, "machine": common.machine(), "jax": jax.__version__,
              "prompt": PROMPT, "new_tokens": NEW, "profiles": {}}
    for name, kwargs in FORMATS.items():
        params = float_params if kwargs is None else int8.quantize(float_params, **kwargs)
        for B in args.batches:
            row = profile(config, params, B)
            result["profiles"][f"{name}_b{B}"] = row
            cells = "  ".join(f"{k} {v:.2f}" for k, v in row["ms_per_step"].items())
            print(f"{name:<9} batch {B}: {row['traced_ms_per_step']:.2f} ms/step  ({cells})",
                  flush=True)
    common.write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
