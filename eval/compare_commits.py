"""gpt2jax's own train and decode figures at two commits, side by side, in one run.

    python -m eval.compare_commits --old REV [--new REV] [--rounds 2] [--json PATH]

Each commit is checked out into a temporary `git worktree` (the new one defaults to the work
tree as it is), and each measurement is a fresh process started in that tree, so it imports
that tree's `gpt2jax`, `train` and `eval`. The processes take turns old, new, new, old, ...
(ABBA) so that a drift in the machine's load hits both alike; each figure is the median over
the rounds, and the table gives new / old.

What is measured goes through APIs both sides have (`eval.bench_train._jax_step`, the
trainer's jitted step; `gpt2jax.generate`): the train step of the `baby` (batch 8 x 256) and
124M (batch 4 x 256) shapes in float32, and 124M decoding at batch 1 and 8 with the KV cache,
float32 and W8A8 weights, prompt 32 + 128 new tokens and total lengths 64 and 256 (half
prompt, half new), as tokens per second of the whole call (median of the timed calls).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from eval import common
from gpt2jax import cli

# Runs inside the tree being measured; prints one JSON line of {figure: tokens per second}.
_PROBE = r"""
import json, statistics, sys, time
import jax, numpy as np
from eval.bench_train import _jax_step
from gpt2jax import generate
from gpt2jax.config import GPTConfig
from gpt2jax.model import init_params
from gpt2jax.quant import int8

what, steps, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
if what == "train":
    for name, preset, batch, seq in (("baby", "baby", 8, 256), ("124m", "gpt2", 4, 256)):
        step, state, x, y, lr = _jax_step(GPTConfig.preset(preset), batch, seq)
        times = []
        for i in range(steps + 2):  # two untimed: compile, then a warm step
            t = time.perf_counter()
            state, metrics = step(state, x, y, lr)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        out[f"train_{name}_fp32"] = batch * seq / statistics.median(times[2:])
else:
    config = GPTConfig.preset("gpt2")
    params = init_params(config, jax.random.key(0))
    kinds = {"fp32": params, "w8a8": int8.quantize(params, mode="w8a8")}
    cells = [("p32n128", 32, 128), ("L64", 32, 32), ("L256", 128, 128)]
    rng = np.random.default_rng(0)
    for kind, p in kinds.items():
        for batch in (1, 8):
            for cell, prompt, new in cells:
                prompts = rng.integers(0, config.vocab_size, (batch, prompt)).tolist()
                run = lambda: np.asarray(generate(p, config, prompts, max_new_tokens=new,
                                                  key=jax.random.key(0), temperature=0.0))
                run()
                times = []
                for _ in range(calls):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
                out[f"decode_{kind}_b{batch}_{cell}"] = batch * new / statistics.median(times)
print("RESULT " + json.dumps(out))
"""


def _measure(tree: Path, what: str, steps: int, calls: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", _PROBE, what, str(steps), str(calls)],
                          cwd=tree, env={**env, "PYTHONPATH": str(tree)}, capture_output=True,
                          text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"probe in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _git(*args: str, cwd: Path = common.ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def compare(old: str, new: str | None, rounds: int, steps: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpt2jax-compare-") as tmp:
        trees = {}
        for side, rev in (("old", old), ("new", new)):
            if rev is None:
                trees[side] = common.ROOT
                continue
            trees[side] = Path(tmp) / side
            _git("worktree", "add", "--detach", str(trees[side]), rev)
        try:
            figures: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
            order = [s for r in range(rounds) for s in (("old", "new") if r % 2 == 0
                                                        else ("new", "old"))]
            for what in ("train", "decode"):
                for side in tqdm(order, desc=what):
                    for key, value in _measure(trees[side], what, steps, calls).items():
                        figures[side].setdefault(key, []).append(value)
        finally:
            for side, rev in (("old", old), ("new", new)):
                if rev is not None:
                    _git("worktree", "remove", "--force", str(trees[side]))
    median = {side: {k: statistics.median(v) for k, v in f.items()}
              for side, f in figures.items()}
    return {
        "machine": common.machine(),
        "old": old, "old_commit": _git("rev-parse", old),
        "new": new or "work tree", "new_commit": _git("rev-parse", new or "HEAD"),
        "code_hash": common.code_hash(),
        "rounds": rounds, "train_steps": steps, "decode_calls": calls,
        "samples": figures, "old_tok_s": median["old"], "new_tok_s": median["new"],
        "new_over_old": {k: median["new"][k] / median["old"][k] for k in median["old"]},
    }


def table(result: dict) -> str:
    rows = ["| figure (tok/s) | old | new | new / old |", "|---|---:|---:|---:|"]
    for key, ratio in result["new_over_old"].items():
        rows.append(f"| `{key}` | {result['old_tok_s'][key]:.1f} | "
                    f"{result['new_tok_s'][key]:.1f} | {ratio:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = cli.ArgumentParser("python -m eval.compare_commits", description=__doc__)
    p.add_argument("--old", required=True, help="the commit to compare against")
    p.add_argument("--new", default=None, help="default: the work tree as it is")
    p.add_argument("--json", type=Path, default=common.RESULTS / "compare_commits.json")
    p.add_argument("--rounds", type=int, default=2, help="turns per side (ABBA order)")
    p.add_argument("--calls", type=int, default=3, help="timed generate calls per cell")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per shape")
    args = p.parse_args(argv)
    result = compare(args.old, args.new, args.rounds, args.steps, args.calls)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
