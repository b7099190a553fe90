"""The main job's recipe search: which optimizer and regularization reach the lowest val loss
in a fixed wall-clock budget, on the shakespeare preset's model.

    python -m eval.recipe [--minutes 5] [--seeds 3] [--arms NAME ...] [--quick] [--work DIR]
    python -m eval.recipe --readme      # the table and plot again, from the JSON

Every arm is the `shakespeare` train preset with a few fields changed (ARMS) and a time budget
of --minutes (the final eval on the whole val split included, as in the main job), at
--seeds seeds (init and data order change together). Seeds run outer and arms inner, so an
interrupted search has every arm at its first seeds; finished runs are reused (same config
and code). An arm is ahead of today's recipe by the claims' seed rule (eval.verdicts:
|Δ mean| > 2 pooled sd and > 0.005 nats); the winner is the lowest mean among the arms ahead.

Writes eval/results/recipe.json (a `RecipeResult` record), recipe.png and docs/results.md's
recipe table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from eval import common, verdicts
from train import config as train_config

# Arm name -> TrainConfig fields changed from the preset ("model.<field>" for GPTConfig's).
TODAY = "adamw (today)"
ARMS: dict[str, dict[str, float | str]] = {
    TODAY: {},
    "muon": {"optimizer": "muon"},
    "muon lr 0.05": {"optimizer": "muon", "muon_lr": 0.05},
    "muon + dropout 0.1": {"optimizer": "muon", "model.dropout": 0.1},
    "adamw + dropout 0.1": {"model.dropout": 0.1},
    "adamw + weight decay 0.3": {"weight_decay": 0.3},
}


@dataclasses.dataclass(frozen=True)
class ArmResult:
    name: str
    changes: dict[str, str]  # ARMS' changes, values as text
    seeds: tuple[int, ...]
    val_losses: tuple[float | None, ...]  # per seed; None: diverged
    steps: tuple[int, ...]  # optimizer steps each seed's budget allowed


@dataclasses.dataclass(frozen=True)
class RecipeResult:
    machine: common.Machine
    code: str
    command: str
    minutes: float
    arms: tuple[ArmResult, ...]

    def arm(self, name: str) -> ArmResult:
        return common.lookup(self.arms, name=name)


def arm_config(base: train_config.TrainConfig, changes: dict) -> train_config.TrainConfig:
    model = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("model.")}
    rest = {k: v for k, v in changes.items() if not k.startswith("model.")}
    return base.replace(model=base.model.replace(**model), **rest)


def base_recipe(quick: bool, minutes: float, data: Path) -> train_config.TrainConfig:
    """The preset under a time budget, sampling off; quick: a 1-layer toy of 6 steps."""
    base = train_config.preset("shakespeare").replace(data=str(data), sample_tokens=0)
    if quick:
        return base.replace(model=base.model.replace(n_layer=1, n_head=2, n_embd=32,
                                                     block_size=32),
                            max_steps=6, warmup_steps=1, max_minutes=None, eval_every=10**9,
                            eval_batches=1, final_eval_batches=2, peak_flops=1.0)
    return base.replace(max_minutes=minutes)


def run(quick: bool, minutes: float, seeds: int, arms: list[str], work: Path,
        argv: list[str]) -> RecipeResult:
    code = common.code_hash()  # at the start: the runs train this code
    base = base_recipe(quick, minutes, common.shakespeare_data(work))
    rows: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in range(seeds):
        for name in arms:
            cfg = arm_config(base, ARMS[name]).replace(seed=base.seed + seed)
            slug = "recipe-" + name.replace(" ", "").replace("(", "").replace(")", "")
            row = common.train_variant(cfg, work, f"{slug}-s{seed}")
            rows[name].append(row)
            print(f"seed {seed}  {name:<22} val {row['val_loss']}  ({row['steps']} steps)",
                  flush=True)
    return RecipeResult(
        machine=common.Machine.current(), code=code,
        command=common.command_line("eval.recipe", argv), minutes=minutes,
        arms=tuple(ArmResult(name, {k: str(v) for k, v in ARMS[name].items()}, tuple(range(seeds)),
                             tuple(r["val_loss"] for r in rs), tuple(r["steps"] for r in rs))
                   for name, rs in rows.items()))


def ahead_of_today(result: RecipeResult) -> dict[str, verdicts.Difference]:
    """Each finished arm's difference from today's recipe (negative delta: lower loss)."""
    today = result.arm(TODAY).val_losses
    return {a.name: verdicts.difference(a.val_losses, today) for a in result.arms
            if a.name != TODAY and None not in a.val_losses}


def winner(result: RecipeResult) -> str:
    """The lowest mean among the arms ahead of today's by the seed rule; else today's."""
    ahead = [name for name, d in ahead_of_today(result).items() if d.sign < 0]
    if not ahead:
        return TODAY
    return min(ahead, key=lambda name: np.mean(result.arm(name).val_losses))


def table(result: RecipeResult) -> str:
    diffs = ahead_of_today(result)
    best = winner(result)
    lines = [f"{result.minutes:g}-minute runs of the shakespeare preset's model, on "
             f"{result.machine.cpu} ({result.machine.cores} cores), code `{result.code}`: "
             f"`{result.command}`.", "",
             "| arm | val loss per seed | mean ± sd | steps | Δ vs today (margin) |",
             "|---|---|---:|---:|---:|"]
    for a in result.arms:
        finite = [v for v in a.val_losses if v is not None]
        mean, sd = verdicts.mean_sd(finite) if finite else (float("nan"), float("nan"))
        d = diffs.get(a.name)
        delta = "—" if d is None else f"{d.delta:+.3f} ({d.margin:.3f})"
        mark = " **(winner)**" if a.name == best else ""
        lines.append(f"| {a.name}{mark} | {verdicts.fmt_seeds(a.val_losses)} | {mean:.3f} ± "
                     f"{sd:.3f} | {int(np.mean(a.steps))} | {delta} |")
    lines += ["", verdicts.SEEDS_RULE]
    return "\n".join(lines)


def plot(result: RecipeResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for i, a in enumerate(result.arms):
        finite = [v for v in a.val_losses if v is not None]
        ax.scatter([i] * len(finite), finite, color="gray", s=14, zorder=3)
        if finite:
            mean, sd = verdicts.mean_sd(finite)
            ax.errorbar(i, mean, yerr=0 if np.isnan(sd) else sd, fmt="o", capsize=5,
                        color="C1" if a.name == winner(result) else "C0", zorder=4)
    ax.set_xticks(range(len(result.arms)), [a.name for a in result.arms], rotation=15,
                  fontsize=8)
    ax.set_ylabel("val loss, whole val split (nats)")
    ax.set_title(f"{result.minutes:g}-minute budget, {len(result.arms[0].seeds)} seeds per arm "
                 f"(mean ± sd; winner orange), {result.machine.cpu}", fontsize=9)
    ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)

    def minutes(text: str) -> float:
        if not float(text) > 0:
            raise argparse.ArgumentTypeError(f"{text}: a run needs a budget > 0 minutes")
        return float(text)

    def more(p):
        p.add_argument("--minutes", type=minutes, default=5.0, help="wall-clock budget per run")
        p.add_argument("--readme", action="store_true",
                       help="train nothing: rewrite recipe.png and docs/results.md's table "
                            "from --out's recipe.json")
        p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                       metavar="ARM", help=f"arms to run (default all: {', '.join(ARMS)})")

    args = common.parse_experiment_args("python -m eval.recipe", __doc__,
                                        "a 1-layer toy of 6 steps per arm", argv,
                                        work=Path("out/recipe"), seeds=True,
                                        more_arguments=more)
    if TODAY not in args.arms:
        args.arms = [TODAY, *args.arms]  # every arm is judged against it
    path = args.out / "recipe.json"
    if not args.readme:
        common.write_record(path, run(args.quick, args.minutes, args.seeds, args.arms,
                                      args.work, argv))
    result = common.read_record(path, RecipeResult)
    plot(result, path.with_suffix(".png"))
    if args.out.resolve() == common.RESULTS.resolve():  # the committed run, not a smoke test
        common.write_readme_block("recipe", table(result), common.RESULTS_DOC)
    print(table(result))


if __name__ == "__main__":
    main()
