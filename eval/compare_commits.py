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
The JSON is a `CompareResult` record (`eval.common.write_record`).
"""

from __future__ import annotations

import dataclasses
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
only = set(sys.argv[4].split(",")) if sys.argv[4] else None  # figures to measure
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
                if only is not None and f"decode_{kind}_b{batch}_{cell}" not in only:
                    continue
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


@dataclasses.dataclass(frozen=True)
class Tree:
    """One side of the comparison."""

    rev: str  # as given (--old, --new), or "work tree"
    commit: str  # its full hash (HEAD's for the work tree)
    code_hash: str  # common.code_hash of the tree measured


@dataclasses.dataclass(frozen=True)
class CommitFigure:
    name: str  # what the probe measured, e.g. decode_w8a8_b8_L256 (the names --only takes)
    old: tuple[float, ...]  # tokens/s, one per round
    new: tuple[float, ...]

    @property
    def old_tok_s(self) -> float:
        return statistics.median(self.old)

    @property
    def new_tok_s(self) -> float:
        return statistics.median(self.new)

    @property
    def new_over_old(self) -> float:
        return self.new_tok_s / self.old_tok_s

    def per_round(self) -> list[float]:
        """new / old of the k-th run of each side: they share round k, so its load cancels."""
        return [n / o for o, n in zip(self.old, self.new, strict=True)]


@dataclasses.dataclass(frozen=True)
class CompareResult:
    machine: common.Machine
    command: str | None  # None: run before records kept it
    old: Tree
    new: Tree
    rounds: int
    train_steps: int
    decode_calls: int
    only: tuple[str, ...] | None  # the figures asked for (--only); None: every figure
    figures: tuple[CommitFigure, ...]


def _measure(tree: Path, what: str, steps: int, calls: int, only: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", _PROBE, what, str(steps), str(calls), only],
                          cwd=tree, env={**env, "PYTHONPATH": str(tree)}, capture_output=True,
                          text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"probe in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _git(*args: str, cwd: Path = common.ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def compare(old: str, new: str | None, rounds: int, steps: int, calls: int,
            only: list[str] | None = None, command: str | None = None) -> CompareResult:
    with tempfile.TemporaryDirectory(prefix="gpt2jax-compare-") as tmp:
        trees = {}
        for side, rev in (("old", old), ("new", new)):
            if rev is None:
                trees[side] = common.ROOT
                continue
            trees[side] = Path(tmp) / side
            _git("worktree", "add", "--detach", str(trees[side]), rev)
        try:
            hashes = {side: common.code_hash(tree) for side, tree in trees.items()}
            samples: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
            order = [s for r in range(rounds) for s in (("old", "new") if r % 2 == 0
                                                        else ("new", "old"))]
            parts = [w for w in ("train", "decode")
                     if not only or any(f.startswith(w) for f in only)]
            for what in parts:
                for side in tqdm(order, desc=what):
                    measured = _measure(trees[side], what, steps, calls, ",".join(only or []))
                    for key, value in measured.items():
                        if only and key not in only:
                            continue
                        samples[side].setdefault(key, []).append(value)
        finally:
            for side, rev in (("old", old), ("new", new)):
                if rev is not None:
                    _git("worktree", "remove", "--force", str(trees[side]))
    return CompareResult(
        machine=common.Machine.current(), command=command,
        old=Tree(old, _git("rev-parse", old), hashes["old"]),
        new=Tree(new or "work tree", _git("rev-parse", new or "HEAD"), hashes["new"]),
        rounds=rounds, train_steps=steps, decode_calls=calls,
        only=None if only is None else tuple(only),
        figures=tuple(CommitFigure(name, tuple(old_tok_s), tuple(samples["new"][name]))
                      for name, old_tok_s in samples["old"].items()))


def table(result: CompareResult, json_name: str) -> str:
    """docs/results.md's table of the record written to eval/results/`json_name`."""
    m, old, new = result.machine, result.old, result.new
    rows = [f"Old {old.commit[:7]} (code {old.code_hash}) against new {new.commit[:7]} (code "
            f"{new.code_hash}), {m.cpu}, {m.cores} cores; {result.rounds} runs per side in "
            f"ABBA order, medians (`eval/results/{json_name}`).", "",
            "| figure (tok/s) | old | new | new / old | per round: mean ± sd |",
            "|---|---:|---:|---:|---:|"]
    for f in result.figures:
        paired = f.per_round()
        spread = statistics.stdev(paired) if len(paired) > 1 else float("nan")
        rows.append(f"| `{f.name}` | {f.old_tok_s:.1f} | {f.new_tok_s:.1f} | "
                    f"{f.new_over_old:.3f} | {statistics.mean(paired):.3f} ± {spread:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = cli.ArgumentParser("python -m eval.compare_commits", description=__doc__)
    p.add_argument("--old", help="the commit to compare against (needed unless --readme)")
    p.add_argument("--new", default=None, help="default: the work tree as it is")
    p.add_argument("--json", type=Path, default=common.RESULTS / "compare_commits.json")
    p.add_argument("--rounds", type=int, default=2, help="turns per side (ABBA order)")
    p.add_argument("--calls", type=int, default=3, help="timed generate calls per cell")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per shape")
    p.add_argument("--only", nargs="+", help="just these figures (e.g. decode_w8a8_b8_L256)")
    p.add_argument("--readme", action="store_true",
                   help="write docs/results.md's table from --json (no run)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if not args.readme and not args.old:
        p.error("--old REV is needed to run the comparison")
    if args.readme:
        result = common.read_record(args.json, CompareResult)
        common.write_readme_block(args.json.stem, table(result, args.json.name),
                                  common.RESULTS_DOC)
        print(f"wrote docs/results.md's {args.json.stem} table from {args.json}")
        return 0
    result = compare(args.old, args.new, args.rounds, args.steps, args.calls, args.only,
                     command=common.command_line("eval.compare_commits", argv))
    common.write_record(args.json, result)
    print(table(result, args.json.name))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
