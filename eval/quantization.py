"""Claim 6: int8 weights, with the norm leaves left in float. What it costs and what it saves.

    python -m eval.quantization [--quick] [--ckpt DIR] [--out eval/results]

Val loss / perplexity and bytes for: float32, int8 per-channel (norms skipped, the default),
int8 per-tensor, and int8 with the norm leaves quantized too. Writes quantization.json and
quantization.png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eval.common import RESULTS, perplexity, trained_model, val_loss, write_json  # noqa: E402
from gpt2jax.quant import int8  # noqa: E402

VARIANTS = {
    "float32": None,
    "int8 per-channel (norms float)": dict(granularity="channel"),
    "int8 per-tensor (norms float)": dict(granularity="tensor"),
    "int8 per-channel + norms int8": dict(granularity="channel",
                                          skip=int8.skip_embeddings_and_biases),
}


def run(params, config, val_tokens, *, max_tokens=None) -> dict:
    rows = {}
    for name, kwargs in VARIANTS.items():
        tree = params if kwargs is None else int8.quantize(params, **kwargs)
        nll = val_loss(tree, config, val_tokens, max_tokens=max_tokens)
        rows[name] = {"val_loss": nll, "perplexity": perplexity(nll), "bytes": int8.nbytes(tree)}
        print(f"{name:<34} val loss {nll:.4f}  ppl {perplexity(nll):8.3f}  "
              f"{rows[name]['bytes'] / 2**20:8.2f} MiB")
    base = rows["float32"]
    norm_leaves = sum(x.size for path, x in _leaves(params) if int8.is_norm_leaf(path))
    for row in rows.values():
        row["delta_loss_pct"] = 100 * (row["val_loss"] / base["val_loss"] - 1)
        row["size_vs_float32"] = row["bytes"] / base["bytes"]
    return {"variants": rows, "norm_params": int(norm_leaves),
            "norm_bytes_saved_by_int8": int(norm_leaves * 3)}


def _leaves(params):
    import jax

    return jax.tree_util.tree_leaves_with_path(params)


def plot(result: dict, path: Path) -> Path:
    names = list(result["variants"])
    rows = [result["variants"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    short = [n.replace(" (norms float)", "\n(norms float)").replace(" + ", "\n+ ") for n in names]
    ax1.bar(short, [r["val_loss"] for r in rows], color=["gray", "C0", "C1", "C3"])
    lo = min(r["val_loss"] for r in rows)
    ax1.set_ylim(lo * 0.98, max(r["val_loss"] for r in rows) * 1.01)
    ax1.set_ylabel("val loss (nats/token)")
    ax1.set_title("quality")
    ax2.bar(short, [r["bytes"] / 2**20 for r in rows], color=["gray", "C0", "C1", "C3"])
    ax2.set_ylabel("parameter bytes (MiB)")
    ax2.set_title("size")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("INT8 weights: norms skipped vs quantized (Tiny Shakespeare val)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~1-minute model, part of val")
    p.add_argument("--ckpt", help="evaluate this training checkpoint instead of training one")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="training budget when no --ckpt (default: 1 quick, 5 full)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as work:
        config, params, val = trained_model(ckpt=args.ckpt, quick=args.quick, out=work,
                                            minutes=args.train_minutes)
        result = run(params, config, val, max_tokens=8192 if args.quick else None)
    result["model"] = config.to_dict()
    result["command"] = "python -m eval.quantization" + (" --quick" if args.quick else "")
    write_json(out / "quantization.json", result)
    plot(result, out / "quantization.png")
    print(f"wrote {out / 'quantization.json'} and {out / 'quantization.png'}")


if __name__ == "__main__":
    main()
