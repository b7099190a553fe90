"""Claim 2: learned vs sinusoidal vs RoPE positions, at the same token budget.

    python -m eval.positions [--quick] [--out eval/results] [--work out/claims]

Trains the `baby` model (6 layers, 384 dims, context 256) on Tiny Shakespeare once per scheme
and seed (--seeds, default 3), changing only `pos_embedding`, with the same data order, steps
and learning rate per seed; records the
val-loss curves, the parameters each scheme adds, and the loss by token position on windows
of twice the training context (learned positions have no embedding past it: they cannot be
evaluated there). Writes positions.json and positions.png.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
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
from eval.verdicts import fmt_seeds, mean_sd, per_seed
from gpt2jax import checkpoint, model
from gpt2jax.config import GPTConfig
from train import TrainConfig
from train import data as data_lib

SCHEMES = ("learned", "sinusoidal", "rope")


def recipe(quick: bool, data: Path) -> TrainConfig:
    """The shared training setup: baby at 200 steps x 4 x 256 tokens (quick: a 1-layer toy)."""
    if quick:
        model_config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
        return TrainConfig(model=model_config, data=str(data), batch_size=4, max_steps=6,
                           warmup_steps=1, lr=3e-3, min_lr=3e-4, eval_every=10**9,
                           eval_batches=1, final_eval_batches=2, ckpt_every=10**9,
                           sample_tokens=0, peak_flops=1.0)
    return TrainConfig(model=GPTConfig.preset("baby"), data=str(data), batch_size=4,
                       max_steps=200, warmup_steps=20, lr=1e-3, min_lr=1e-4, eval_every=50,
                       eval_batches=8, ckpt_every=10**9, sample_tokens=0, peak_flops=1.0)


@functools.partial(jax.jit, static_argnums=(2,))
def _position_nll(params, windows_NT, config: GPTConfig):
    """[T-1] mean NLL of predicting token t+1 from tokens 0..t, over the N windows."""
    logits, _ = model.apply(params, windows_NT[:, :-1], config)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, windows_NT[:, 1:, None], -1)[..., 0]
    return nll.mean(0)


def loss_by_position(params, config: GPTConfig, tokens: np.ndarray, length: int,
                     max_windows: int) -> np.ndarray:
    """Mean NLL at each position of non-overlapping windows of `length` tokens (batches of 4)."""
    n = min(max_windows, (len(tokens) - 1) // length)
    windows = np.asarray(tokens[: n * length], np.int32).reshape(n, length)
    total = np.zeros(length - 1)
    for i in range(0, n - n % 4, 4):
        total += 4 * np.asarray(_position_nll(params, jnp.asarray(windows[i:i + 4]), config))
    return total / (n - n % 4)


def run(quick: bool, out: Path, work: Path, seeds: int = 1) -> dict:
    code = common.code_hash()  # at the start: the runs train this code
    data = shakespeare_data(work)
    base = recipe(quick, data)
    T = base.model.block_size
    val = np.asarray(data_lib.load_split(data, "val"))
    rows = {}
    for scheme in SCHEMES:
        cfg = base.replace(model=base.model.replace(pos_embedding=scheme))
        row = train_seeds(cfg, work, f"pos-{scheme}", seeds)
        config, params = checkpoint.load(row["config"]["out"])  # the first seed's model
        row["position_params"] = model.param_breakdown(config)["position_embedding"]
        row["total_params"] = model.param_breakdown(config)["total"]
        row["loss_by_position_T"] = loss_by_position(params, config, val, T, 64).tolist()
        if scheme == "learned":
            row["loss_by_position_2T"] = None  # wpe has T rows: there is no position T
        else:  # sinusoidal and RoPE compute positions: the same params at context 2T
            long = config.replace(block_size=2 * T)
            row["loss_by_position_2T"] = loss_by_position(params, long, val, 2 * T, 32).tolist()
        rows[scheme] = row
        beyond = row["loss_by_position_2T"]
        print(f"{scheme:<10} +{row['position_params']:>7,} params  val {row['val_loss']:.4f}  "
              f"loss at positions >= T: "
              f"{'n/a' if beyond is None else f'{np.mean(beyond[T:]):.4f}'}")
    for row in rows.values():
        if row["loss_by_position_2T"] is not None:
            beyond = np.asarray(row["loss_by_position_2T"])
            row["mean_loss_first_T"] = float(beyond[: T - 1].mean())
            row["mean_loss_beyond_T"] = float(beyond[T:].mean())
    result = {
        **common.provenance(code),
        "command": f"python -m eval.positions{' --quick' if quick else ''}",
        "train": {k: v for k, v in base.to_dict().items() if k not in ("out", "data")},
        "block_size": T, "tokens_per_run": base.max_steps * base.tokens_per_step,
        "runs": rows, "summary": summary(rows, T),
    }
    write_json(out / "positions.json", result)
    plot(result, out / "positions.png")
    return result


def extrapolation_penalty(loss_by_position_2T, T: int) -> float:
    """Mean loss at positions past the training context T minus the mean over the context's
    second half: a window's first positions (little context, high loss) left out of the
    baseline, which would otherwise hide a rise past T."""
    loss = np.asarray(loss_by_position_2T)
    return float(loss[T:].mean() - loss[T // 2: T - 1].mean())


def summary(rows: dict, T: int) -> dict:
    best = min(rows, key=lambda s: rows[s]["val_loss"])
    vals = {s: rows[s]["val_loss"] for s in rows}
    return {"best_val": best, "val_loss": vals,
            "rope_minus_learned": vals["rope"] - vals["learned"],
            "extrapolation_penalty": {
                s: extrapolation_penalty(rows[s]["loss_by_position_2T"], T)
                for s in ("rope", "sinusoidal")}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    T = result["block_size"]
    for i, (scheme, row) in enumerate(result["runs"].items()):
        color = f"C{i}"
        ax1.plot(*trailing_mean(row["train_loss"], 20)[:2], color=color, alpha=0.5, lw=1)
        if row["val_curve"]:
            steps, vals = zip(*row["val_curve"], strict=True)
            ax1.plot(steps, vals, "o-", color=color, label=f"{scheme} (+"
                     f"{row['position_params']:,} params): {fmt_seeds(per_seed(row))}")
            # the final val loss over every seed: mean ± sd beside the first seed's curve
            mean, sd = mean_sd(per_seed(row))
            ax1.errorbar(steps[-1] + 4 * (i + 1), mean, yerr=0 if math.isnan(sd) else sd,
                         fmt="s", ms=4, capsize=3, color=color)
        curve = np.asarray(row["loss_by_position_2T"] or row["loss_by_position_T"])
        width = max(1, T // 16)  # mean over bins of positions: one window is noisy
        n = len(curve) // width
        binned = curve[: n * width].reshape(n, width).mean(1)
        ax2.plot((np.arange(n) + 0.5) * width, binned, "o-", ms=3, color=color, label=scheme)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (train: thin, val: dots; square: mean ± sd over seeds)")
    ax1.set_title(f"same tokens ({result['tokens_per_run']:,} per run)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.axvline(T, color="gray", ls=":", label=f"training context {T}")
    ax2.set_xlabel("position in the window (tokens of left context)")
    ax2.set_ylabel(f"val NLL, mean over bins of {max(1, T // 16)} positions")
    ax2.set_title("loss by position, windows of 2x the training context\n"
                  "(learned positions stop at T: no embedding beyond)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    save_figure(fig, path)


main = experiment_main("python -m eval.positions", __doc__,
                       "a 1-layer toy, 6 steps per scheme", run)


if __name__ == "__main__":
    main()
