"""Where a train step's time goes: a jax.profiler trace of the jitted step, by category.

    python -m eval.profile_step [--shape baby|124m] [--steps 2] [--json PATH] [--top 15]

Traces `--steps` steps of the benchmark's train step (eval.bench_train's shapes) with XLA's
per-op trace events (`--xla_cpu_enable_xprof_traceme=true`), joins every traced op to its
instruction in the compiled HLO, and sums op time by what the op is for: the dense layer
matmuls, the output head's three matmuls, attention, the cross-entropy's passes over the
logits, the layer loop's stacking and slicing, copies and transposes, and the optimizer.
Op time is per step; the per-op trace adds a little overhead, so the step time printed
beside it is the untraced median. Beside it, the step's dense matmuls are timed alone at
their shapes: what XLA's GEMMs need whatever the rest of the step does, which bounds the
MFU any step built on them can reach.
"""

from __future__ import annotations

import os

# Per-op trace events must be switched on before XLA initializes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from eval import bench_train, common  # noqa: E402
from gpt2jax.config import GPTConfig  # noqa: E402
from train import perf  # noqa: E402

CATEGORIES = (
    "layer matmuls", "head matmuls", "cross-entropy passes", "attention", "layer-loop stacking",
    "copies/transposes", "optimizer", "other elementwise",
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (opcode or fusion name, JAX op_name metadata or '')."""
    table = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            op = _OP_NAME.search(line)
            table[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return table


def categorize(name: str, op_name: str) -> str:
    """The category of one compiled op from its instruction name and its JAX source path."""
    in_model = "GPT" in op_name or "/h/" in op_name
    is_dot = name.startswith(("dot", "ynn_fusion")) or "dot_general" in op_name
    if any(s in name for s in ("dynamic-update-slice", "dynamic-slice", "wrapped_broadcast")):
        return "layer-loop stacking"
    if any(s in op_name for s in ("BTD,VD->BTV", "CD,VD->CV", "CV,VD->CD", "CV,CD->VD")):
        return "head matmuls" if is_dot else "cross-entropy passes"
    if is_dot and in_model and any(f"/{s}/" in op_name for s in ("c_attn", "c_proj", "c_fc")):
        return "layer matmuls"
    if name.startswith(("copy", "transpose", "concatenate", "slice")):
        return "copies/transposes"
    if "/attn/" in op_name:
        return "attention"
    if not in_model and "jvp" not in op_name and op_name:
        return "optimizer"  # after the gradient: clip, Adam, decay, the update
    if not in_model and op_name:
        return "cross-entropy passes"  # the loss outside the model
    return "other elementwise"


def op_times(trace_dir: Path, instructions: dict) -> collections.Counter:
    """Microseconds per compiled op, summed over the trace's events."""
    (trace_file,) = trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz")
    events = json.load(gzip.open(trace_file))["traceEvents"]
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in instructions:
            totals[e["name"]] += e["dur"]
    return totals


def dense_matmuls(config: GPTConfig, tokens: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of every dense matmul of one train step: per Linear and for the head,
    the forward x @ W, and the backward dy @ W.T and x.T @ dy."""
    D, L, V = config.n_embd, config.n_layer, config.vocab_size
    shapes = []
    for k, n, count in ((D, 3 * D, L), (D, D, L), (D, 4 * D, L), (4 * D, D, L), (D, V, 1)):
        shapes += [(tokens, k, n, count), (tokens, n, k, count), (k, tokens, n, count)]
    return shapes


def matmul_floor(config: GPTConfig, tokens: int) -> dict:
    """The step's dense matmuls timed alone at their shapes (median of 5 each): the time XLA's
    GEMMs need whatever else the step does, and its FLOP rate."""
    key = jax.random.key(0)
    seconds = flops = 0.0
    for m, k, n, count in dense_matmuls(config, tokens):
        a, b = jax.random.normal(key, (m, k)), jax.random.normal(key, (k, n))
        matmul = jax.jit(lambda a, b: a @ b)
        seconds += count * bench_train.time_steps(
            lambda a=a, b=b, f=matmul: f(a, b).block_until_ready(), warmup=1, steps=5)
        flops += count * 2.0 * m * k * n
    return {"matmul_s": seconds, "matmul_flops": flops}


def profile(shape: str, steps: int = 2) -> dict:
    preset, batch, seq = bench_train.SHAPES[shape]
    config = GPTConfig.preset(preset)
    run_step, _ = bench_train.jax_runner(config, batch, seq)
    step_s = bench_train.time_steps(run_step, warmup=1, steps=5)
    hlo = bench_train.compiled_step_text(config, batch, seq)
    instructions = hlo_instructions(hlo)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run_step()
        totals = op_times(Path(tmp), instructions)
    by_category = collections.Counter()
    top = []
    for name, us in totals.most_common():
        kind, op_name = instructions[name]
        category = categorize(name, op_name)
        by_category[category] += us / steps / 1e6
        top.append({"op": name, "category": category, "s_per_step": us / steps / 1e6,
                    "source": op_name})
    peak = perf.measure_peak_flops()
    floor = matmul_floor(config, batch * seq)
    model_flops = perf.flops_per_token(config, seq) * batch * seq
    return {"shape": shape, "batch": batch, "seq": seq, "step_s": step_s, "peak_flops": peak,
            "mfu": model_flops / step_s / peak, **floor,
            "matmul_efficiency": floor["matmul_flops"] / floor["matmul_s"] / peak,
            "op_s": sum(by_category.values()),
            "categories": {c: by_category.get(c, 0.0) for c in CATEGORIES}, "top_ops": top}


def format_table(result: dict, top: int) -> str:
    r = result
    lines = [f"{r['shape']} ({r['batch']} x {r['seq']}): step {r['step_s']:.3f} s untraced "
             f"(MFU {r['mfu']:.1%} of {r['peak_flops'] / 1e9:.0f} GFLOP/s), {r['op_s']:.3f} s of "
             f"traced op time; its dense matmuls alone take {r['matmul_s']:.3f} s "
             f"({r['matmul_efficiency']:.1%} of the peak at their shapes), the rest "
             f"{r['step_s'] - r['matmul_s']:.3f} s",
             "| category | s / step | share of op time |", "|---|---:|---:|"]
    for c, s in sorted(result["categories"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {c} | {s:.3f} | {s / result['op_s']:.1%} |")
    lines += ["", "| op | category | s / step | source |", "|---|---|---:|---|"]
    for row in result["top_ops"][:top]:
        lines.append(f"| {row['op']} | {row['category']} | {row['s_per_step']:.4f} | "
                     f"{row['source'][-70:]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(bench_train.SHAPES), nargs="+",
                        default=list(bench_train.SHAPES))
    parser.add_argument("--steps", type=int, default=2, help="traced steps (default 2)")
    parser.add_argument("--top", type=int, default=15, help="ops listed (default 15)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = {"machine": common.machine(), "jax": jax.__version__, "profiles": []}
    for shape in args.shape:
        result = profile(shape, args.steps)
        print(format_table(result, args.top), flush=True)
        results["profiles"].append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
