"""Claim 4, decisive: where does post-LN train, and does it end lower than pre-LN there?

    python -m eval.norms_regime [--quick] [--seeds 3] [--out eval/results] [--work out/claims]
                                [--lrs 1e-4 3e-4 --warmups 100 500 | --cells LR:WARMUP ...]
                                [--depth 6]

`eval.norms` trains its grid at the depth and learning rates where pre-LN is comfortable, and
post-LN never leaves the unigram plateau there, so "post-LN can end at a better loss" goes
untested. This searches the settings post-LN is said to need: a shallower model (6 layers),
lower learning rates {1e-4, 3e-4} and longer warmup {100, 500 steps}, 1000 steps each, one seed
per cell, every placement (pre-LN, post-LN, DeepNorm with DeepNet's init), no clipping, same
data order. Then, at the setting where every placement trains and post-LN ends lowest (the
one most favourable to the claim), each placement is trained at --seeds seeds: the verdict
compares post-LN with pre-LN there by the seed rule. The global gradient norm of every step
is kept from the trainer's metrics; per-layer gradient norms over training come from a probe:
the first seed's run again with a checkpoint every tenth of the run (the same run: checkpoints
change no number, and its final val loss is recorded beside the arm's), and at each
checkpoint ‖∇ block l‖ on one fixed batch of val tokens.

--depth N searches a deeper (or shallower) model at the same width: its results go to
norms_regime_dN.json / .png beside the 6-layer search's, and the claims report adds them as a
check (the verdict stays on the 6-layer search's seeded arms). `eval.claims` does not run it:
a 12-layer cell is three 1000-step runs, three more with the probes (--no-probes skips them).

Writes norms_regime.json and norms_regime.png (norms_regime_dN.* with --depth N).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from eval.common import (
    SEEDS,
    code_hash,
    parse_experiment_args,
    provenance,
    save_figure,
    shakespeare_data,
    trailing_mean,
    train_seeds,
    train_variant,
    write_json,
)
from eval.norms import LONG, PLACEMENTS, block_grad_norms, recipe
from eval.verdicts import UNIGRAM_LOSS, losses_by_cell, trained
from gpt2jax.checkpoint import Checkpointer
from train import TrainConfig
from train import data as data_lib
from train.step import token_losses
from train.trainer import initial_params

DEPTH, STEPS, LRS, WARMUPS = 6, 1000, (1e-4, 3e-4), (100, 500)
PROBES = 10  # per-layer gradient probes over a run (plus one at init)


def result_name(depth: int) -> str:
    """The JSON a search at `depth` writes: the default depth's is the claim's experiment,
    another depth's a check beside it."""
    return "norms_regime.json" if depth == DEPTH else f"norms_regime_d{depth}.json"


def probe_batch(data: Path, block_size: int, rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) [rows, block_size]: the first tokens of the val split, the same at every probe."""
    val = np.asarray(data_lib.load_split(data, "val"))
    x = val[: rows * block_size].astype(np.int32).reshape(rows, block_size)
    y = val[1: rows * block_size + 1].astype(np.int32).reshape(rows, block_size)
    return x, y


def layer_grads_over_training(cfg: TrainConfig, work: Path, name: str) -> dict:
    """{'steps', 'norms' [probe][layer], 'val_loss'}: ‖∇ block l‖ on 8 fixed rows of val
    tokens at init and at PROBES checkpoints of `cfg`'s run, trained again (cached) with
    those checkpoints kept."""
    every = max(1, cfg.max_steps // PROBES)
    probe = cfg.replace(ckpt_every=every, keep_checkpoints=cfg.max_steps // every + 1)
    row = train_variant(probe, work, f"{name}-probe")
    config, params = initial_params(probe)
    x, y = probe_batch(Path(cfg.data), config.block_size)
    grad = jax.jit(jax.grad(lambda p: token_losses(p, x, y, config).mean()))
    folder = Path(row["config"]["out"]).absolute() / "checkpoints"  # orbax reads absolute paths
    steps, norms = [0], [block_grad_norms(grad(params))]
    reader = Checkpointer(folder, keep=None, read_only=True)
    try:
        saved = reader.steps()
    finally:
        reader.close()
    abstract = jax.eval_shape(lambda: params)
    for step in saved:  # the 'params' item of each step, read with orbax's own reader
        params = ocp.StandardCheckpointer().restore(folder / str(step) / "params", abstract)
        steps.append(step)
        norms.append(block_grad_norms(grad(params)))
    return {"steps": steps, "norms": norms, "val_loss": row["val_loss"]}


def run(quick: bool, out: Path, work: Path, seeds: int, lrs=LRS, warmups=WARMUPS,
        cells: tuple[tuple[float, int], ...] | None = None, depth: int = DEPTH,
        probes: bool = True) -> dict:
    """Search every (lr, warmup) in `cells` (default: lrs × warmups) at `depth` layers;
    `probes`: per-layer gradient norms over the chosen cell's first seeds (a run each)."""
    json_name = result_name(depth)  # --quick trains the toy's depth, under the same name
    code = code_hash()  # at the start: the runs train this code
    data = shakespeare_data(work)
    base = recipe(quick, data)
    if quick:  # the setting of `eval.norms --quick`'s grid: its runs are reused by name
        depth, steps = base.model.n_layer, base.max_steps
        lrs, warmups = (LONG["lr"],), (min(LONG["warmup_steps"], base.max_steps // 4),)
    else:
        steps = STEPS

    def name(placement, lr, warmup):
        if quick:
            return f"norm-{placement}-lr{lr:g}-w{warmup}"
        return f"regime-{placement}-d{depth}-{steps}steps-lr{lr:g}-w{warmup}"

    def config(placement, lr, warmup):
        return base.replace(model=base.model.replace(n_layer=depth, norm_placement=placement),
                            lr=lr, min_lr=lr / 10, warmup_steps=warmup, max_steps=steps)

    if quick or cells is None:
        cells = tuple((lr, warmup) for lr in lrs for warmup in warmups)
        command = ("" if quick or tuple(lrs) == LRS else f" --lrs {' '.join(map(str, lrs))}") \
            + ("" if quick or tuple(warmups) == WARMUPS
               else f" --warmups {' '.join(map(str, warmups))}")
    else:
        command = f" --cells {' '.join(f'{lr:g}:{warmup}' for lr, warmup in cells)}"
    command += "" if quick or depth == DEPTH else f" --depth {depth}"
    command += "" if seeds == (1 if quick else SEEDS) else f" --seeds {seeds}"
    command += "" if probes else " --no-probes"
    lrs = sorted({lr for lr, _ in cells})
    warmups = sorted({warmup for _, warmup in cells})
    grid = []
    for lr, warmup in cells:
        for placement in PLACEMENTS:
            row = train_seeds(config(placement, lr, warmup), work,
                              name(placement, lr, warmup), 1)
            grid.append({"placement": placement, "lr": lr, "warmup": warmup,
                         "val_loss": row["val_loss"], "diverged": row["diverged"]})
            print(f"{placement:<8} lr {lr:<6g} warmup {warmup:<4d} val {row['val_loss']}",
                  flush=True)
    losses_at = losses_by_cell(grid)
    all_train = [cell for cell, losses in losses_at.items()
                 if all(map(trained, losses.values()))]
    chosen = min(all_train, key=lambda cell: losses_at[cell]["post"], default=None)
    arms = {}
    if chosen is not None:
        lr, warmup = chosen
        for placement in PLACEMENTS:
            cfg = config(placement, lr, warmup)
            row = train_seeds(cfg, work, name(placement, lr, warmup), seeds)
            arms[placement] = {k: row[k] for k in ("val_losses", "seeds", "train_loss",
                                                   "grad_norm")}
            if probes:
                arms[placement]["layer_grads"] = layer_grads_over_training(
                    cfg, work, name(placement, lr, warmup))
            print(f"{placement:<8} {seeds} seeds: {row['val_losses']}", flush=True)
    result = {
        **provenance(code),
        "command": "python -m eval.norms_regime" + (" --quick" if quick else "") + command,
        "depth": depth, "steps": steps, "lrs": lrs, "warmups": warmups,
        "cells": [list(cell) for cell in cells],
        "train": {k: v for k, v in config("pre", lrs[0], warmups[0]).to_dict().items()
                  if k not in ("out", "data", "lr", "min_lr", "warmup_steps")},
        "grid": grid, "chosen": None if chosen is None else {"lr": chosen[0],
                                                              "warmup": chosen[1]},
        "arms": arms,
    }
    path = write_json(out / json_name, result)
    plot(result, path.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax1, ax2, ax3), layer_axes = axes
    cells = sorted({(r["lr"], r["warmup"]) for r in result["grid"]})
    width = 0.8 / len(PLACEMENTS)
    for i, placement in enumerate(PLACEMENTS):
        losses = [next(r["val_loss"] for r in result["grid"]
                       if (r["placement"], r["lr"], r["warmup"]) == (placement, *cell))
                  for cell in cells]
        ax1.bar(np.arange(len(cells)) + (i - 1) * width,
                [np.nan if v is None else v for v in losses], width, color=f"C{i}",
                label=placement)
    ax1.axhline(UNIGRAM_LOSS, color="gray", ls=":", label="unigram")
    ax1.set_xticks(range(len(cells)), [f"lr {lr:g}\nwarmup {w}" for lr, w in cells])
    finite = [r["val_loss"] for r in result["grid"] if r["val_loss"] is not None]
    if finite:
        ax1.set_ylim(min(finite) - 0.2, max(max(finite), UNIGRAM_LOSS) + 0.1)
    ax1.set_ylabel("final val loss (one seed)")
    ax1.set_title(f"search: {result['depth']} layers, {result['steps']} steps, no clipping")
    ax1.legend(fontsize=8)
    chosen = result["chosen"]
    for i, (placement, arm) in enumerate(result["arms"].items()):
        mean = np.mean(arm["val_losses"])
        ax2.plot(*trailing_mean(arm["train_loss"], 25)[:2], color=f"C{i}", lw=1,
                 label=f"{placement}: val {mean:.3f} ± {np.std(arm['val_losses'], ddof=1):.3f}"
                 if len(arm["val_losses"]) > 1 else f"{placement}: val {mean:.3f}")
        if arm["grad_norm"]:
            ax3.plot(*trailing_mean(arm["grad_norm"], 25)[:2], color=f"C{i}", lw=1,
                     label=placement)
    for ax, what in ((ax2, "train loss (first seed)"), (ax3, "global gradient norm")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if result["arms"]:
            ax.legend(fontsize=8)
    ax3.set_yscale("log")
    title = (f"lr {chosen['lr']:g}, warmup {chosen['warmup']}" if chosen
             else "no setting where every placement trains")
    ax2.set_title(title)
    ax3.set_title(title)
    probed = {p: arm["layer_grads"] for p, arm in result["arms"].items() if "layer_grads" in arm}
    for ax, (placement, probes) in zip(layer_axes, probed.items(), strict=False):
        by_layer = np.asarray(probes["norms"]).T
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(by_layer)))
        for layer, (norms, color) in enumerate(zip(by_layer, colors, strict=True)):
            ax.plot(probes["steps"], norms, "o-", ms=3, color=color, label=f"layer {layer}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("‖∇ block‖ on 8 fixed val rows")
        ax.set_title(f"{placement}: per-layer gradient norms (first seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in layer_axes[len(probed):]:
        ax.axis("off")
    save_figure(fig, path)


def main(argv=None) -> None:
    def grid_arguments(p):
        p.add_argument("--lrs", type=float, nargs="+", default=list(LRS),
                       help=f"learning rates searched (default {' '.join(map(str, LRS))})")
        p.add_argument("--warmups", type=int, nargs="+", default=list(WARMUPS),
                       help=f"warmup steps searched (default {' '.join(map(str, WARMUPS))})")

        p.add_argument("--cells", type=_cell, nargs="+", metavar="LR:WARMUP",
                       help="search these (lr, warmup) pairs instead of --lrs × --warmups, "
                       "e.g. 3e-4:0 3e-4:100 1e-4:100")
        p.add_argument("--depth", type=_depth, default=DEPTH,
                       help=f"layers (default {DEPTH}; another depth writes "
                       "norms_regime_d<depth>.json, a check beside the claim's search)")
        p.add_argument("--no-probes", dest="probes", action="store_false",
                       help="skip the per-layer gradient probes (one more run per placement)")

    args = parse_experiment_args("python -m eval.norms_regime", __doc__,
                                 "the runs of eval.norms --quick, reused", argv,
                                 seeds=True, more_arguments=grid_arguments)
    if args.quick and args.depth != DEPTH:
        raise SystemExit(f"--depth {args.depth} with --quick: the smoke run reuses "
                         "eval.norms --quick's toy runs at their own depth; drop one of them")
    run(args.quick, args.out, args.work, args.seeds, tuple(args.lrs), tuple(args.warmups),
        tuple(args.cells) if args.cells else None, args.depth, args.probes)


def _depth(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of layers (an integer ≥ 1)")
    return int(text)


def _cell(text: str) -> tuple[float, int]:
    """'3e-4:100' -> (0.0003, 100)."""
    lr, _, warmup = text.partition(":")
    try:
        return float(lr), int(warmup)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not LR:WARMUP (a float and an integer, e.g. 3e-4:100)") from None


if __name__ == "__main__":
    main()
