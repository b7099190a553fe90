"""Claim 3: tying lm_head to wte saves ~30% of GPT-2 small, and almost nothing at scale.

    python -m eval.tying [--quick] [--out eval/results] [--work out/claims]

The parameter table comes from the shapes of every preset (tied and untied); the training
comparison trains `baby` tied and untied with the same data, steps and learning rate, at
--seeds seeds (default 3; the tied runs are the positions experiment's learned runs: same
configs, trained once). Writes
tying.json and tying.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval import common
from eval.common import (
    experiment_main,
    save_figure,
    shakespeare_data,
    trailing_mean,
    train_seeds,
    write_json,
)
from eval.positions import recipe
from eval.verdicts import fmt_seeds, per_seed
from gpt2jax.config import PRESETS, GPTConfig
from gpt2jax.model import param_breakdown


def parameter_table() -> list[dict]:
    """Per preset: the tied count, what untying adds, and the embeddings' share of each."""
    rows = []
    for name in PRESETS:
        tied = param_breakdown(GPTConfig.preset(name))
        untied = param_breakdown(GPTConfig.preset(name, tie_embeddings=False))
        rows.append({
            "preset": name, "tied": tied["total"], "untied": untied["total"],
            "lm_head_extra": untied["total"] - tied["total"],
            "wte_share_tied_pct": 100 * tied["token_embedding"] / tied["total"],
            "embedding_share_tied_pct": tied["embedding_share_pct"],
            "saved_by_tying_pct": 100 * (untied["total"] - tied["total"]) / untied["total"],
        })
    return rows


def run(quick: bool, out: Path, work: Path, seeds: int = 1) -> dict:
    code = common.code_hash()  # at the start: the runs train this code
    table = parameter_table()
    for r in table:
        print(f"{r['preset']:<12} tied {r['tied']:>13,}  untied {r['untied']:>13,}  "
              f"wte share {r['wte_share_tied_pct']:5.1f}%  tying saves "
              f"{r['saved_by_tying_pct']:5.1f}%")
    base = recipe(quick, shakespeare_data(work))
    runs = {}
    for tied in (True, False):
        cfg = base.replace(model=base.model.replace(pos_embedding="learned",
                                                    tie_embeddings=tied))
        runs["tied" if tied else "untied"] = train_seeds(
            cfg, work, "pos-learned" if tied else "untied", seeds)
    runs["tied"]["params"] = param_breakdown(base.model)["total"]
    runs["untied"]["params"] = param_breakdown(base.model.replace(tie_embeddings=False))["total"]
    for name, row in runs.items():
        print(f"{name:<7} {row['params']:>12,} params  val {row['val_loss']:.4f}")
    by = {r["preset"]: r for r in table}
    result = {
        **common.provenance(code),
        "command": f"python -m eval.tying{' --quick' if quick else ''}",
        "table": table, "runs": runs,
        "tokens_per_run": base.max_steps * base.tokens_per_step,
        "summary": {
            "gpt2_wte_share_pct": by["gpt2"]["wte_share_tied_pct"],
            "gpt2-xl_wte_share_pct": by["gpt2-xl"]["wte_share_tied_pct"],
            "baby_val_untied_minus_tied": runs["untied"]["val_loss"] - runs["tied"]["val_loss"],
        },
    }
    write_json(out / "tying.json", result)
    plot(result, out / "tying.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = result["table"]
    names = [r["preset"] for r in table]
    x = np.arange(len(names))
    ax1.bar(x - 0.2, [r["tied"] / 1e6 for r in table], 0.4, label="tied")
    ax1.bar(x + 0.2, [r["untied"] / 1e6 for r in table], 0.4, label="untied")
    for i, r in enumerate(table):
        ax1.annotate(f"wte {r['wte_share_tied_pct']:.1f}%", (i, r["untied"] / 1e6),
                     ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, names)
    ax1.set_yscale("log")
    ax1.set_ylabel("parameters (millions)")
    ax1.set_title("what tying saves: the share of the token embedding")
    ax1.legend()
    for name, row in result["runs"].items():
        ax2.plot(*trailing_mean(row["train_loss"], 20)[:2], lw=1,
                 label=f"{name} ({row['params'] / 1e6:.1f}M): val {fmt_seeds(per_seed(row))}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("train loss (first seed)")
    ax2.set_title(f"baby, same tokens ({result['tokens_per_run']:,})")
    ax2.grid(alpha=0.3)
    ax2.legend()
    save_figure(fig, path)


main = experiment_main("python -m eval.tying", __doc__,
                       "a 1-layer toy for the training part", run)


if __name__ == "__main__":
    main()
