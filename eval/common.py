"""What the experiments share: a small model trained on Tiny Shakespeare, its val tokens,
and the way results are written (JSON + PNG under eval/results/; the benchmarks' as typed
records, `write_record` / `read_record`)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import time
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

from eval.perplexity import sliding_window_nll
from gpt2jax import checkpoint, cli
from gpt2jax.config import GPTConfig
from train import config as train_config
from train import data as data_lib
from train.perf import cores, cpu_model, machine  # noqa: F401 (the benchmarks' import)
from train.trainer import NonFiniteLossError, resolve_data, train

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
SEEDS = 3  # per arm: the fewest that give a seed-to-seed sd to compare differences with
CODE_DIRS = ("gpt2jax", "train")  # the code a training run depends on


def code_hash(root: Path = ROOT) -> str:
    """A hash of every Python file under gpt2jax/ and train/ (paths and bytes): a fix to the
    model or the trainer changes it, so runs trained before the fix are not reused."""
    h = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def run_key(cfg: train_config.TrainConfig, root: Path = ROOT) -> str:
    """What a cached run is reused by: its config (without its folder) and the code hash."""
    payload = cfg.replace(out="").to_json() + code_hash(root)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def toy_model(out: str | Path) -> tuple[GPTConfig, dict, np.ndarray]:
    """(config, params, val tokens) of a smoke run: the shakespeare recipe cut to a 2-layer
    model and 30 steps, trained into `out`."""
    recipe = train_config.preset("shakespeare").replace(out=str(out))
    data_dir = resolve_data(recipe)  # Tiny Shakespeare encoded once into out/data
    recipe = recipe.replace(
        model=recipe.model.replace(n_layer=2, n_head=2, n_embd=128, block_size=64),
        warmup_steps=5, eval_batches=1, final_eval_batches=2, max_steps=30, max_minutes=None,
        data=str(data_dir), eval_every=10_000, ckpt_every=10**9, sample_tokens=0)
    train(recipe, progress=True)
    config, params = checkpoint.load(Path(out))
    return config, params, val_tokens(data_dir)


def val_tokens(data_dir: Path) -> np.ndarray:
    return np.asarray(data_lib.load_split(data_dir, "val"))


def shakespeare_data(work: str | Path) -> Path:
    """Tiny Shakespeare encoded once into work/data (a prepared folder)."""
    if data_lib.is_prepared(Path(work) / "data"):
        return Path(work) / "data"
    recipe = train_config.preset("shakespeare")
    return resolve_data(recipe.replace(out=str(work)))


def unigram_val_loss(train_tokens, val_tokens, vocab_size: int, add: float = 1.0) -> float:
    """Val cross-entropy (nats) of the train split's unigram model with add-`add` smoothing
    over the whole vocabulary (add-one: Laplace's, nothing tuned on val): the loss a model
    reaches by learning token frequencies alone, so below it a run has learned context."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size) + add
    return float(-np.log(counts[np.asarray(val_tokens)] / counts.sum()).mean())


def train_variant(cfg: train_config.TrainConfig, work: str | Path, name: str,
                  summarize: Callable[[Path], dict] | None = None) -> dict:
    """Train `cfg` (its `out` replaced by a folder under work/ named after `name` and
    `run_key`) and return its curves, plus `summarize(run folder)` of a run that did not
    diverge; a finished run with the same config and code is reused, so experiments that
    share a baseline train it once, and an experiment cut short resumes where it stopped.
    A run whose loss turns NaN/inf is recorded as diverged rather than raised."""
    out = Path(work) / f"{name}-{run_key(cfg)}"
    cfg = cfg.replace(out=str(out))
    done = out / "variant.json"
    if done.exists():
        return json.loads(done.read_text())
    t = time.perf_counter()
    try:
        result = train(cfg, progress=False)
        diverged, final_val, steps = False, result.val_loss, result.step
    except NonFiniteLossError:
        diverged, final_val, steps = True, None, None
    else:
        if result.stopped == "signal":  # SIGTERM/SIGINT: cut short, so never a reusable run
            raise KeyboardInterrupt(f"{name}: stopped by a signal at step {result.step}; its "
                                    f"folder {out} is not recorded as a finished run")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    row = {
        "name": name, "config": cfg.to_dict(), "diverged": diverged,
        "steps": steps if steps is not None else len(losses),
        "tokens": len(losses) * cfg.tokens_per_step, "train_loss": losses,
        "grad_norm": [r["grad_norm"] for r in records if "grad_norm" in r],
        "val_curve": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
        "val_loss": final_val, "wall_s": time.perf_counter() - t, "code": code_hash(),
    }
    if summarize is not None and not diverged:
        row.update(summarize(out))
    done.write_text(json.dumps(row))
    return row


def seeded(rows: list[dict], seeds: list[int]) -> dict:
    """One arm of a comparison from its per-seed rows: the first seed's row (its curves
    draw the plots) with every seed's final val loss in `val_losses` (None: diverged) and
    `val_loss` their mean over the seeds that did not diverge (None if none)."""
    losses = [row["val_loss"] for row in rows]
    finite = [x for x in losses if x is not None]
    return {**rows[0], "seeds": seeds, "val_losses": losses,
            "val_loss": float(np.mean(finite)) if finite else None,
            "diverged": not finite}


def train_seeds(cfg: train_config.TrainConfig, work: str | Path, name: str,
                seeds: int) -> dict:
    """`train_variant` at seeds cfg.seed, cfg.seed + 1, ... (init and data order change
    together), merged by `seeded`; the first seed keeps `name`, so its run is shared with
    experiments that train one seed."""
    values = [cfg.seed + i for i in range(seeds)]
    rows = [train_variant(cfg.replace(seed=s), work, name if s == cfg.seed else f"{name}-s{s}")
            for s in values]
    return seeded(rows, values)


def trailing_mean(values, max_window: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, means, n): the n-step trailing mean of a per-step series counted from step 1,
    n = max_window or a fifth of the series if shorter (one step is too noisy to plot)."""
    values = np.asarray(values)
    n = max(1, min(max_window, len(values) // 5))
    return np.arange(n, len(values) + 1), np.convolve(values, np.ones(n) / n, "valid"), n


def parse_experiment_args(prog: str, doc: str, quick_help: str, argv=None, *,
                          work: Path | None = Path("out/claims"), seeds: bool = False,
                          more_arguments=None) -> argparse.Namespace:
    """The flags every experiment takes (--quick, --out, --work), --seeds for those that
    train comparisons, plus `more_arguments(p)`; args.out defaults to eval/results, or
    eval/results/quick with --quick."""
    p = cli.ArgumentParser(prog, description=doc)  # one-line errors, --verbose
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, help="results folder (default eval/results; with "
                   "--quick eval/results/quick)")
    p.add_argument("--work", type=Path, default=work, help=f"training runs, reused when "
                   f"their config and code are unchanged (default {work})")
    if seeds:
        p.add_argument("--seeds", type=int, help="seeds per arm of every training comparison "
                       f"(default {SEEDS}; with --quick 1)")
    if more_arguments is not None:
        more_arguments(p)
    args = p.parse_args(argv)
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    if seeds:
        if args.seeds is None:
            args.seeds = 1 if args.quick else SEEDS
        if args.seeds < 1:
            p.error(f"--seeds {args.seeds}: need at least 1")
    return args


def experiment_main(prog: str, doc: str, quick_help: str, run: Callable) -> Callable:
    """`main(argv)` of an experiment that trains comparisons at seeds: parse the shared flags
    (`parse_experiment_args`), then `run(quick, out, work, seeds)`."""

    def main(argv=None) -> None:
        args = parse_experiment_args(prog, doc, quick_help, argv, seeds=True)
        run(args.quick, args.out, args.work, args.seeds)

    return main


def val_loss(params, config: GPTConfig, val_tokens, *, max_tokens: int | None = None) -> float:
    """Mean NLL (nats/token) over non-overlapping block-size windows of the val split."""
    tokens = val_tokens[:max_tokens] if max_tokens else val_tokens
    nll, _ = sliding_window_nll(params, config, tokens, progress=False)
    return nll


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Every experiment's plot ends the same way: laid out, written as PNG, closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def write_record(path: Path, record) -> Path:
    """A record (a dataclass of JSON values, records, and lists, tuples and str-keyed dicts of
    them) as JSON: `dataclasses.asdict`, read back by `read_record`."""
    return write_json(path, dataclasses.asdict(record))


Record = TypeVar("Record")


def read_record(path: Path, cls: type[Record]) -> Record:
    """The record of type `cls` that `write_record` wrote to `path`."""
    try:
        return from_json(cls, json.loads(Path(path).read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a {cls.__name__} record: {e}") from e


def from_json(hint, value):
    """`value` (parsed JSON) as the type `hint`: a dataclass, X | None, list[X], tuple[X, ...],
    dict[str, X], or a JSON scalar. Unknown fields raise: a file of another schema must not
    load as this one."""
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)  # the annotations are strings (PEP 563)
        names = {f.name for f in dataclasses.fields(hint)}
        if unknown := set(value) - names:
            raise ValueError(f"{hint.__name__} has no fields {sorted(unknown)}")
        return hint(**{name: from_json(hints[name], v) for name, v in value.items()})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return from_json(inner, value)
    if origin is list or (origin is tuple and args[-1] is Ellipsis):
        return origin(from_json(args[0], v) for v in value)
    if origin is tuple:
        return tuple(from_json(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in value.items()}
    return float(value) if hint is float else value  # a float may be written as 2


def lookup(records: Iterable, /, **fields):
    """The one row whose attributes equal `fields` (KeyError if none or several)."""
    found = [r for r in records if all(getattr(r, k) == v for k, v in fields.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows with {fields}")
    return found[0]


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a figure was measured on (`train.perf.machine`)."""

    cpu: str
    cores: int  # the cores the process may use
    sched: str | None = None  # the scheduling policy; None where the OS has no such call

    @classmethod
    def current(cls) -> Machine:
        return cls(**machine())


def provenance(code: str) -> dict:
    """What every experiment's JSON records beside its numbers: the host, and the code its runs
    trained (`code_hash()`, taken when the experiment started)."""
    return {"machine": dataclasses.asdict(Machine.current()), "code": code}


def command_line(module: str, argv: Iterable[str]) -> str:
    """`python -m module argv...` as a record keeps it: paths inside the repository relative to
    its root, so the command reads the same on every checkout."""
    def relative(arg: str) -> str:
        path = Path(arg)
        return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else arg
    return shlex.join(["python", "-m", module, *map(relative, argv)])


def perplexity(nll: float) -> float:
    return math.exp(nll)


README = ROOT / "README.md"
# the generated results page: the decode, training and int8 quality tables
RESULTS_DOC = ROOT / "docs" / "results.md"


def write_readme_block(name: str, text: str, readme: Path = README) -> None:
    """Replace the README text between `<!-- name:begin -->` and `<!-- name:end -->`, so that
    figures in the README are written from eval/results/*.json by code, never by hand."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = readme.read_text()
    if begin not in doc or end not in doc:
        raise ValueError(f"{readme} has no '{begin}' ... '{end}' block to write {name} into")
    head, rest = doc.split(begin, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
