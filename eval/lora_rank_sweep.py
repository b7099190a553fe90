"""Claim 1: LoRA's alpha/r scale starves high ranks; rsLoRA's alpha/sqrt(r) does not.

    python -m eval.lora_rank_sweep [--quick] [--out DIR] [--work DIR] [--base ckpt:DIR]

Tiny Shakespeare is cut at 80% of its characters: a base model is trained on the first part
(the earlier plays); LoRA and rsLoRA adapters on q and v are then fine-tuned on the last part
(other plays, other names) at ranks 4, 16, 64 and 256 with the same alpha, learning rate and
steps, at --seeds seeds (default 3; a seed sets the adapter init and data order, the same for
every rank), through `python -m train`'s own code path (`train()` with lora_rank). Recorded
per run: the train-loss curve, the held-out val loss of the last part, ‖ΔW‖ = ‖s·A·B‖_F over
the adapted kernels, and the trainable count. Writes lora_rank_sweep.json and .png to --out
(default eval/results; --quick: eval/results/quick); the texts, the base (300 steps, not a
time budget, so it is the same model on any machine) and the adapter runs go to --work
(default out/lora_rank_sweep[_quick]), where a finished run is reused while its config and the
code under gpt2jax/ and train/ are unchanged: an interrupted sweep resumes.

The prediction (Kalajdzievski, rsLoRA, arXiv:2312.03732, §3, Theorem 3.2): with alpha/r the
update shrinks as r grows, so LoRA's curves bunch together (or get worse) with rank while
rsLoRA's keep improving.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from eval import common
from eval.common import (
    parse_experiment_args,
    save_figure,
    seeded,
    trailing_mean,
    train_variant,
    write_json,
)
from eval.verdicts import fmt_seeds, mean_sd, per_seed
from gpt2jax import checkpoint, lora, sources
from gpt2jax import data as corpus
from train import TrainConfig
from train import config as train_config
from train import data as data_lib

RANKS = (4, 16, 64, 256)
METHODS = ("lora", "rslora")
BASE_SHARE = 0.8  # of the characters: the base trains on the first part


@dataclasses.dataclass(frozen=True)
class Plan:
    base_steps: int  # a step budget, not minutes: the base is the same on any machine
    base_warmup: int
    base_model: dict  # GPTConfig changes to the shakespeare recipe's model
    base_batch_size: int
    batch_size: int  # of the fine-tunes
    steps: int
    warmup: int
    eval_every: int
    alpha: float = 16.0
    lr: float = 1e-3
    ranks: tuple[int, ...] = RANKS
    final_eval_batches: int = 0  # 0: the whole val split


# fine-tunes of 4 rows: 4 ranks x 2 methods x 3 seeds = 24 runs, 3.2 min each on one shared
# core (8 rows took 4.6 min: the sweep alone would have been two hours)
FULL = Plan(base_steps=300, base_warmup=100, base_model={}, base_batch_size=8,
            batch_size=4, steps=200, warmup=20, eval_every=50)
# A smoke test: a 1-layer, 64-dim base of 6 steps, two ranks, 3 adapter steps each.
QUICK = Plan(base_steps=6, base_warmup=1,
             base_model={"n_layer": 1, "n_head": 2, "n_embd": 64, "block_size": 32},
             base_batch_size=4, batch_size=4, steps=3, warmup=1, eval_every=10_000, ranks=(2, 16),
             final_eval_batches=2)


def split_text(out: Path) -> tuple[Path, Path]:
    """(base text, fine-tune text): the first 80% and the last 20% of Tiny Shakespeare."""
    text = corpus.shakespeare_path().read_text()
    cut = text.rfind("\n\n", 0, int(len(text) * BASE_SHARE))  # at a speech boundary
    out.mkdir(parents=True, exist_ok=True)
    (out / "base.txt").write_text(text[:cut])
    (out / "finetune.txt").write_text(text[cut:])
    return out / "base.txt", out / "finetune.txt"


def prepared(text: Path, block_size: int) -> Path:
    target = text.with_suffix("")
    if not data_lib.is_prepared(target):
        data_lib.prepare(text, target, block_size=block_size)
    return target


def train_base(plan: Plan, data: Path, work: Path) -> str:
    """The base, trained once per config and code (a cached run under work/)."""
    recipe = train_config.preset("shakespeare")
    cfg = recipe.replace(
        model=recipe.model.replace(**plan.base_model), data=str(data), max_minutes=None,
        batch_size=plan.base_batch_size, max_steps=plan.base_steps,
        eval_every=10**9, final_eval_batches=plan.final_eval_batches,
        ckpt_every=10**9, sample_tokens=0, peak_flops=1.0, warmup_steps=plan.base_warmup,
    )
    row = train_variant(cfg, work, "base-model")
    print(f"base: {row['steps']} steps, val loss {row['val_loss']:.3f} on its own text")
    return f"ckpt:{row['config']['out']}"


def adapter_summary(out: Path) -> dict:
    """What a fine-tune's adapters are: scale s, trainable count and ‖s·A·B‖_F."""
    adapters, _ = checkpoint.load_adapters(out)
    return {"scale": adapters.config.scale, "trainable": lora.count(adapters)["trainable"],
            "delta_norm": lora.delta_norm(adapters)}


def finetune(plan: Plan, base: str, data: Path, work: Path, method: str, rank: int,
             block_size: int, seed: int = 0) -> dict:
    """One adapter run (a cached run under work/, keyed by its config, which names the
    base's folder, and the code)."""
    base_model = sources.load_model(base)[0]
    cfg = TrainConfig(
        model=base_model.replace(block_size=block_size), data=str(data),
        init_from=base, lora_rank=rank, lora_alpha=plan.alpha, rslora=method == "rslora",
        batch_size=plan.batch_size, max_steps=plan.steps, warmup_steps=plan.warmup,
        lr=plan.lr, min_lr=plan.lr / 10, weight_decay=0.0, eval_every=plan.eval_every,
        eval_batches=plan.final_eval_batches, final_eval_batches=plan.final_eval_batches,
        ckpt_every=10**9, sample_tokens=0, peak_flops=1.0, seed=seed,
    )
    name = f"{method}_r{rank}{f'_s{seed}' if seed else ''}"
    return {**train_variant(cfg, work, name, adapter_summary), "method": method, "rank": rank}


def base_val_loss(base: str, data: Path, block_size: int) -> float:
    """The base's loss on the fine-tune val split, before any adapter step."""
    from eval.perplexity import sliding_window_nll

    config, params = sources.load_model(base, block_size=block_size)
    nll, _ = sliding_window_nll(params, config, np.asarray(data_lib.load_split(data, "val")),
                                progress=False)
    return nll


def summary(runs: list[dict], base_loss: float) -> dict:
    """Numbers that decide the claim: the spread of final val loss across ranks per method,
    whether it falls with rank, and the ‖ΔW‖ ratio from the lowest rank to the highest."""
    out = {}
    ranks = sorted({r["rank"] for r in runs})
    for method in METHODS:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["rank"])
        vals = [r["val_loss"] for r in mine]
        norms = [r["delta_norm"] for r in mine]
        out[method] = {
            "val_loss_by_rank": dict(zip(ranks, vals, strict=True)),
            "gain_vs_base_by_rank": {k: base_loss - v for k, v in zip(ranks, vals, strict=True)},
            "spread": max(vals) - min(vals),
            "improves_with_rank": bool(np.all(np.diff(vals) <= 1e-3)),
            "delta_norm_high_over_low_rank": norms[-1] / norms[0],
        }
    lora_val, rs_val = (out[m]["val_loss_by_rank"] for m in METHODS)
    out["rslora_minus_lora_val_at_high_rank"] = rs_val[ranks[-1]] - lora_val[ranks[-1]]
    return out


def plot(runs: list[dict], base_loss: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {rank: f"C{i}" for i, rank in enumerate(sorted({r["rank"] for r in runs}))}
    for ax, method in zip(axes[:2], METHODS, strict=True):
        for r in (r for r in runs if r["method"] == method):
            steps, smooth, n = trailing_mean(r["train_loss"], 10)
            ax.plot(steps, smooth, color=colors[r["rank"]],
                    label=f"r={r['rank']} (s={r['scale']:.3g}): val {fmt_seeds(per_seed(r))}")
        ax.axhline(base_loss, color="gray", ls=":", label=f"base val {base_loss:.3f}")
        ax.set_title(f"{'LoRA alpha/r' if method == 'lora' else 'rsLoRA alpha/sqrt(r)'}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss ({n}-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for method, style in zip(METHODS, ("o-", "s-"), strict=True):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["rank"])
        spread = [mean_sd(per_seed(r))[1] for r in mine]  # sd over seeds (nan for one)
        ax.errorbar([r["rank"] for r in mine], [r["val_loss"] for r in mine],
                    yerr=np.nan_to_num(spread), fmt=style, capsize=3, label=method)
    ax.axhline(base_loss, color="gray", ls=":", label="base (no adapters)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("held-out val loss after fine-tuning (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    for method, style in zip(METHODS, ("o--", "s--"), strict=True):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["rank"])
        twin.plot([r["rank"] for r in mine], [r["delta_norm"] for r in mine], style, alpha=0.5,
                  label=f"‖ΔW‖ {method}")
    twin.set_yscale("log")
    norms = [r["delta_norm"] for r in runs]
    twin.set_ylim(min(norms) / 1.3, max(norms) * 1.3)
    twin.set_ylabel("‖s·A·B‖_F (dashed)")
    ax.legend(loc="lower left", fontsize=8)
    twin.legend(loc="center left", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def run(quick: bool, out: Path, work: Path, base: str | None = None, seeds: int = 1) -> dict:
    plan = QUICK if quick else FULL
    code = common.code_hash()  # at the start: the runs train this code
    t0 = time.perf_counter()
    base_text, finetune_text = split_text(work)
    block = train_config.preset("shakespeare").model.replace(**plan.base_model).block_size
    finetune_data = prepared(finetune_text, block)
    if base is None:
        base = train_base(plan, prepared(base_text, block), work)
    block = min(block, sources.load_model(base)[0].block_size)
    base_loss = base_val_loss(base, finetune_data, block)
    runs = []
    from tqdm.auto import tqdm

    for method, rank in tqdm([(m, r) for m in METHODS for r in plan.ranks], desc="fine-tunes"):
        rows = [finetune(plan, base, finetune_data, work, method, rank, block, seed=s)
                for s in range(seeds)]
        runs.append(seeded(rows, list(range(seeds))))
        tqdm.write(f"{method:7s} r={rank:<4d} val {runs[-1]['val_loss']:.4f} "
                   f"‖ΔW‖ {runs[-1]['delta_norm']:.3f} ({runs[-1]['wall_s']:.0f} s)")
    result = {
        **common.provenance(code),
        "command": f"python -m eval.lora_rank_sweep{' --quick' if quick else ''}",
        "plan": dataclasses.asdict(plan), "base": base, "base_val_loss": base_loss,
        "block_size": block, "runs": runs, "summary": summary(runs, base_loss),
        "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lora_rank_sweep.json", result)
    plot(runs, base_loss, out / "lora_rank_sweep.png",
         f"LoRA vs rsLoRA on q,v: fine-tuning on unseen plays, alpha={plan.alpha}, "
         f"lr={plan.lr}, {plan.steps} steps")
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = ["| method | rank | scale | trainable | val loss | gain vs base | ‖ΔW‖ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['rank']} | {r['scale']:.4g} | {r['trainable']:,} | "
                     f"{r['val_loss']:.4f} | {result['base_val_loss'] - r['val_loss']:+.4f} | "
                     f"{r['delta_norm']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_experiment_args(
        "python -m eval.lora_rank_sweep", __doc__, "a 1-layer base, ranks 2 and 16, 3 steps each",
        argv, work=None, seeds=True, more_arguments=lambda p: p.add_argument(
            "--base", help="ckpt:DIR or hf:DIR: a base to adapt instead of training one (it "
            "should not have seen the last 20%% of Tiny Shakespeare)"))
    work = args.work or Path("out") / f"lora_rank_sweep{'_quick' if args.quick else ''}"
    run(args.quick, args.out, work, args.base, args.seeds)


if __name__ == "__main__":
    main()
