"""Claim 6: int8, with the norm leaves left in float. What it costs and what it saves.

    python -m eval.quantization [--seeds 3] [--work out/claims] [--out eval/results]
    python -m eval.quantization --ckpt DIR [--name NAME]     # one given model
    python -m eval.quantization --quick                      # a smoke run on a toy model

The model is the main job's (`python -m train --preset shakespeare`: 4 layers x 256, RoPE),
trained MAIN_JOB_STEPS steps at each seed (cached runs under --work). For each: val loss /
perplexity on the whole val split, greedy agreement with float32 over 200 new tokens (8 val
prompts), and bytes for: float32; int8 weights per-channel (norms skipped, the default),
per-tensor, and with the norm leaves quantized too (int8 and 4-bit, one scale per γ and per β
vector; 4-bit values kept one per byte, so their bytes are int8's); W8A8 (int8 activations per
token) without and with SmoothQuant (α = 0.5, calibrated on the first 512 tokens of the
training text), and that with `wte` int8 too. The JSON holds each variant's means over the
seeds and the per-seed values; writes quantization.json and quantization.png."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eval import common  # noqa: E402
from eval.common import (  # noqa: E402
    perplexity,
    save_figure,
    val_loss,
    write_json,
    write_readme_block,
)
from eval.verdicts import fmt_pct, fmt_seeds, per_seed, per_seed_pct  # noqa: E402
from gpt2jax import checkpoint, sources  # noqa: E402
from gpt2jax.generation import generate  # noqa: E402
from gpt2jax.layers import weight  # noqa: E402
from gpt2jax.quant import int8  # noqa: E402
from gpt2jax.quantize import calibrate, calibration_tokens, smoothquant  # noqa: E402
from train.config import TrainConfig, preset  # noqa: E402

SMOOTH_ALPHA = 0.5
# The main job's 14.5-minute clock ended it at 709 and 715 steps on this project's 2-core host
# (eval/results/train_shakespeare.json): its seeds here train that many steps.
MAIN_JOB_STEPS = 700


def norms_at(bits: int):
    """int8 kernels (per channel) with the norm leaves quantized to `bits` too, one scale per
    γ and per β vector (per entry would be lossless by construction). The model reads norms
    float: `as_evaluated` rounds them back."""
    def build(params, smoothed):
        def convert(path, leaf):
            if not int8.is_norm_leaf(path):
                return leaf
            return int8.QTensor(*int8.absmax_quantize(leaf, (-1,), bits))
        return jax.tree_util.tree_map_with_path(
            convert, int8.quantize(params), is_leaf=lambda x: isinstance(x, int8.QTensor))
    return build


def as_evaluated(tree):
    """A variant's tree as the model runs it: quantized norm leaves dequantized (quantize then
    dequantize, the ablation's whole effect), every other leaf as it is."""
    def convert(path, leaf):
        return weight(leaf).dequantize() if int8.is_norm_leaf(path) else leaf
    return jax.tree_util.tree_map_with_path(
        convert, tree, is_leaf=lambda x: isinstance(x, int8.QTensor))


# name: (float params, SmoothQuant-ed params) -> the evaluated tree
VARIANTS = {
    "float32": lambda params, smoothed: params,
    "int8 per-channel (norms float)": lambda params, smoothed: int8.quantize(params),
    "int8 per-tensor (norms float)":
        lambda params, smoothed: int8.quantize(params, granularity="tensor"),
    "int8 per-channel + norms int8": norms_at(8),
    "int8 per-channel + norms 4-bit": norms_at(4),
    "w8a8": lambda params, smoothed: int8.quantize(params, mode="w8a8"),
    "w8a8 + SmoothQuant": lambda params, smoothed: int8.quantize(smoothed, mode="w8a8"),
    "w8a8 + SmoothQuant + wte int8":
        lambda params, smoothed: int8.quantize(smoothed, mode="w8a8", embeddings=True),
}
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 16, 200


def greedy(params, config, prompts, new_tokens: int) -> np.ndarray:
    return np.asarray(generate(params, config, prompts, max_new_tokens=new_tokens,
                               key=jax.random.key(0), temperature=0.0))


def run(params, config, val_tokens, *, max_tokens=None, calibration=None,
        new_tokens: int = NEW_TOKENS, n_prompts: int = PROMPTS) -> dict:
    """`calibration`: SmoothQuant's token ids (default: the first 512 of the training text);
    greedy agreement over `n_prompts` val prompts and `new_tokens` new tokens."""
    calibration = calibration_tokens(None) if calibration is None else calibration
    smoothed = smoothquant(params, config, calibration, SMOOTH_ALPHA)
    outliers = activation_outliers(params, config, calibration)
    if config.pos_embedding == "learned":
        new_tokens = min(new_tokens, config.block_size - PROMPT_TOKENS)
    step = max(1, (len(val_tokens) - PROMPT_TOKENS) // n_prompts)
    prompts = [val_tokens[i * step: i * step + PROMPT_TOKENS].tolist() for i in range(n_prompts)]
    reference = greedy(params, config, prompts, new_tokens)
    rows = {}
    for name, build in VARIANTS.items():
        stored = build(params, smoothed)
        tree = as_evaluated(stored)
        nll = val_loss(tree, config, val_tokens, max_tokens=max_tokens)
        equal = greedy(tree, config, prompts, new_tokens) == reference
        rows[name] = {"val_loss": nll, "perplexity": perplexity(nll), "bytes": int8.nbytes(stored),
                      "greedy_match": float(equal.mean()),
                      "tokens_before_first_difference": float(np.mean(
                          [int(np.argmin(r)) if not r.all() else new_tokens for r in equal]))}
        print(f"{name:<34} val loss {nll:.4f}  ppl {perplexity(nll):8.3f}  "
              f"{rows[name]['bytes'] / 2**20:8.2f} MiB  greedy "
              f"{100 * rows[name]['greedy_match']:.1f}%")
    base = rows["float32"]
    norm_leaves = sum(x.size for path, x in _leaves(params) if int8.is_norm_leaf(path))
    for row in rows.values():
        row["delta_loss_pct"] = 100 * (row["val_loss"] / base["val_loss"] - 1)
        row["size_vs_float32"] = row["bytes"] / base["bytes"]
    return {"variants": rows, "norm_params": int(norm_leaves),
            "norm_bytes_saved_by_int8": int(norm_leaves * 3), "smooth_alpha": SMOOTH_ALPHA,
            "calibration_tokens": len(calibration), "greedy_new_tokens": new_tokens,
            "activation_outliers": outliers,
            "greedy_prompts": n_prompts}


def activation_outliers(params, config, tokens) -> dict:
    """How far the LayerNorm outputs' largest channel stands out (LLM.int8, arXiv:2208.07339
    §3): per layer, max over median of the per-channel max |input| of c_attn and c_fc. A
    per-token int8 scale spends its range on that channel; SmoothQuant evens it out."""
    rows = max(1, len(tokens) // config.block_size)
    width = min(config.block_size, len(tokens))
    absmax = calibrate(params, config, np.asarray(tokens)[:rows * width].reshape(rows, width))
    return {name: [float(a.max() / np.median(a)) for a in np.asarray(v)]
            for name, v in absmax.items()}


def _leaves(params):
    return jax.tree_util.tree_leaves_with_path(params)


def plot(result: dict, path: Path) -> Path:
    names = list(result["variants"])
    rows = [result["variants"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    short = [n.replace(" (norms float)", "\n(norms float)").replace(" + ", "\n+ ") for n in names]
    colors = ["gray", *(f"C{i}" for i in range(len(names) - 1))]
    # each seed's change against its own float32 model: the seeds' spread in absolute loss
    # (~0.03 nats) would hide differences of a few thousandths of a percent
    deltas = [per_seed_pct(r) for r in rows]
    spread = [np.std(d, ddof=1) if len(d) > 1 else 0.0 for d in deltas]
    ax1.bar(short, [np.mean(d) for d in deltas], color=colors, yerr=spread, capsize=3)
    ax1.axhline(0, color="gray", lw=0.5)
    ax1.set_ylabel("val loss change vs float32 (%, mean ± sd over seeds)")
    ax1.set_title("quality")
    ax2.bar(short, [r["bytes"] / 2**20 for r in rows], color=colors)
    ax2.set_ylabel("parameter bytes (MiB)")
    ax2.set_title("size")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("INT8: weights only (norms skipped vs quantized) and W8A8 (Tiny Shakespeare val)")
    save_figure(fig, path, dpi=120)
    return path


def readme_table(result: dict) -> str:
    """docs/results.md's quality table, every figure from quantization.json (with seeds: means,
    and the sd over the seeds' models)."""
    model = result["model"]
    trained = result.get("trained")
    seeds = result.get("seeds", 1)
    lines = [f"{model['n_layer']} layers × {model['n_embd']} dims, {model['pos_embedding']} "
             f"positions"
             # seeds train by steps: their wall time is the machine's load, not the model
             + (f", trained {trained['step']} steps each at {seeds} seeds (mean ± sd over "
                f"their models)" if seeds > 1 else
                f", trained {trained['step']} steps ({trained['wall_s'] / 60:.0f} min)"
                if trained else "")
             + f" (`{result['command']}`); val loss over the whole val split, greedy "
             f"tokens equal to float32's over {result['greedy_new_tokens']} new tokens from "
             f"{result['greedy_prompts']} val prompts; largest LayerNorm-output channel over the "
             f"median channel (c_attn / c_fc inputs, worst layer): "
             f"{max(result['activation_outliers']['c_attn']):.1f} / "
             f"{max(result['activation_outliers']['c_fc']):.1f}",
             "", "| variant | val loss | Δ vs float32 | greedy tokens equal | bytes |",
             "|---|---:|---:|---:|---:|"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | {fmt_seeds(per_seed(row), 4)} | {fmt_pct(per_seed_pct(row))} | "
                     f"{100 * row['greedy_match']:.1f}% | {row['bytes']:,} |")
    return "\n".join(lines)


def main_job_recipe(data: Path, seed: int) -> TrainConfig:
    """The main job's recipe (`python -m train --preset shakespeare`) ended by steps, not its
    14.5-minute clock, so the model does not depend on the machine's load."""
    return preset("shakespeare").replace(
        data=str(data), seed=seed, max_minutes=None, max_steps=MAIN_JOB_STEPS,
        eval_every=10_000, ckpt_every=10**9, sample_tokens=0)


def seeded_models(work: Path, seeds: int):
    """(config, params, how it was trained) of the main job's recipe at seeds 0..seeds-1,
    each a cached run under `work` (reused while its config and the training code stand)."""
    data = common.shakespeare_data(work)
    for seed in range(seeds):
        row = common.train_variant(main_job_recipe(data, seed), work, f"main-job-s{seed}")
        if row["diverged"]:
            raise RuntimeError(f"the main job's recipe diverged at seed {seed}: see "
                               f"{row['config']['out']}")
        config, params = checkpoint.load(Path(row["config"]["out"]))
        yield config, params, {"seed": seed, "step": row["steps"], "val_loss": row["val_loss"],
                               "wall_s": row["wall_s"]}


def aggregate(seed_results: list[dict]) -> dict:
    """One result from each seed's `run` (same variants, same val split): every variant's
    figures are the seeds' means, with the per-seed values beside them (`val_losses`,
    `delta_loss_pcts`); the activation outliers are the largest per layer over the seeds."""
    first = seed_results[0]
    variants = {}
    for name, row in first["variants"].items():
        rows = [result["variants"][name] for result in seed_results]
        variants[name] = {**row, **{key: float(np.mean([r[key] for r in rows])) for key in (
            "val_loss", "perplexity", "greedy_match", "tokens_before_first_difference",
            "delta_loss_pct", "size_vs_float32")},
            "val_losses": [r["val_loss"] for r in rows],
            "delta_loss_pcts": [r["delta_loss_pct"] for r in rows]}
    outliers = {name: np.max([result["activation_outliers"][name] for result in seed_results],
                             axis=0).tolist() for name in first["activation_outliers"]}
    return {**first, "variants": variants, "activation_outliers": outliers,
            "seeds": len(seed_results)}


def main(argv=None):
    def more_arguments(p):
        p.add_argument("--ckpt", help="evaluate this one training checkpoint instead of "
                       "training the main job's recipe at --seeds seeds")
        p.add_argument("--name", default="quantization",
                       help="results file stem: OUT/NAME.json and .png (one per model)")
        p.add_argument("--readme", action="store_true",
                       help="write docs/results.md's quality tables from --out's "
                       "quantization*.json")

    args = common.parse_experiment_args(
        "python -m eval.quantization", __doc__.splitlines()[0],
        "smoke run: a 30-step toy model (or --ckpt), part of val, 2 short greedy prompts",
        argv, seeds=True, more_arguments=more_arguments)
    out = Path(args.out)
    if args.readme:
        paths = sorted(out.glob("quantization*.json"))
        write_readme_block("quantization", "\n\n".join(
            readme_table(json.loads(path.read_text())) for path in paths), common.RESULTS_DOC)
        print(f"wrote {common.RESULTS_DOC.relative_to(common.ROOT)}'s int8 quality tables from "
              f"{', '.join(map(str, paths))}")
        return
    quick = dict(max_tokens=512, new_tokens=8, n_prompts=2) if args.quick else {}
    code = common.code_hash()  # at the start: the models under test are trained by this code
    with tempfile.TemporaryDirectory() as tmp:
        if args.ckpt or args.quick:
            if args.ckpt:
                config, params = sources.load_checkpoint(args.ckpt)
                val = common.val_tokens(common.shakespeare_data(tmp))
            else:
                config, params, val = common.toy_model(tmp)
            result = aggregate([run(params, config, val, **quick)])
            summary = Path(args.ckpt or "", "summary.json")
            if args.ckpt and summary.exists():  # how the checkpoint was trained, from the trainer
                trained = json.loads(summary.read_text())
                result["trained"] = {k: trained[k] for k in ("step", "stopped", "val_loss",
                                                             "wall_s")}
        else:
            val = common.val_tokens(common.shakespeare_data(args.work))
            seed_results, trained = [], []
            for config, params, info in seeded_models(args.work, args.seeds):
                print(f"==> seed {info['seed']}: {info['step']} steps, val {info['val_loss']:.4f}")
                seed_results.append(run(params, config, val))
                trained.append(info)
            result = aggregate(seed_results)
            result["trained"] = {"step": MAIN_JOB_STEPS, "stopped": "max_steps",
                                 "val_loss": float(np.mean([t["val_loss"] for t in trained])),
                                 "wall_s": float(np.mean([t["wall_s"] for t in trained])),
                                 "per_seed": trained}
            result["per_seed"] = seed_results
    result.update(common.provenance(code), model=config.to_dict())
    result["command"] = ("python -m eval.quantization" + (" --quick" if args.quick else "")
                         + (f" --ckpt {args.ckpt}" if args.ckpt else "")
                         + (f" --seeds {args.seeds}" if not (args.ckpt or args.quick) else "")
                         + (f" --name {args.name}" if args.name != "quantization" else ""))
    write_json(out / f"{args.name}.json", result)
    plot(result, out / f"{args.name}.png")
    print(f"wrote {out / args.name}.json and .png")


if __name__ == "__main__":
    main()
