"""Claim 5b: TurboQuant shrinks the KV cache 5-6x at ~3 bits per value "with zero accuracy loss".

    python -m eval.kv_quant [--quick] [--ckpt DIR] [--out eval/results] [--work out/claims]

On a model trained on Tiny Shakespeare (--ckpt, e.g. the main training run out/shakespeare;
default: the positions experiment's `baby` run, trained here if missing), the float32 and
bfloat16 caches and TurboQuant caches run as the paper runs them: the prompt is prefilled
with exact attention and only its codes are stored (outlier channels chosen from it), each
decoded token attends to the stored codes and to its own exact key and value. Rates: plain
b = 2, 3, 4 bits with mse or prod keys, the paper's outlier split (a quarter of the channels
at b + 1) with the channels selected per head, per layer or not at all (channels 0..n-1),
and mse codes with the unbiased scale. Every rate is labelled by its code bits and by its
total bits per value including the float16 norms. Per cache:

- val loss and perplexity of the tokens decoded one at a time after a PROMPT-token prefill;
- greedy agreement with the float32 cache over 200 generated tokens (8 val prompts);
- attention-score error: the scores the cache computes from key codes (query rotated once,
  outliers selected from the first PROMPT keys) against the exact q·k, as RMSE over the
  scores' std, and the total-variation distance between the two attention distributions,
  over every causal pair of every layer and head;
- cache bytes from the arrays (batch 1, 1024 tokens) and bits per value with/without norms.

Writes kv_quant.json and kv_quant.png.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from eval import common, verdicts
from eval.common import (
    parse_experiment_args,
    perplexity,
    save_figure,
    shakespeare_data,
    train_variant,
    write_json,
)
from gpt2jax import positions, sources
from gpt2jax.attention import heads_to_rows, rows_to_heads
from gpt2jax.cache import make_cache
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate
from gpt2jax.model import Block, Norm, apply, token_embedding_scale
from gpt2jax.quant.turboquant import TurboQuantConfig, bits_per_value, quarter_split
from train import TrainConfig
from train import data as data_lib

FLOAT_KINDS = ("float32", "bfloat16")
PROMPT = 32  # tokens prefilled exactly (and the outliers' calibration) before decoding
NEW_TOKENS = 200
BYTES_TOKENS = 1024


def kinds(head_dim: int, quick: bool = False) -> dict[str, object]:
    """Name -> cache kind. Splits are named by their code bits (2.25 = 16@3 + 48@2 at d=64)
    and by how their outlier channels are chosen."""
    out: dict[str, object] = {k: k for k in FLOAT_KINDS}  # bfloat16: the zero-loss bar
    plain = (2, 3) if quick else (2, 3, 4)
    for bits in plain:
        out[f"tq{bits}-mse"] = TurboQuantConfig(bits=bits)
    if not quick:
        for bits in (3, 4):
            out[f"tq{bits}-prod"] = TurboQuantConfig(bits=bits, key_quantizer="prod")
        out["tq3-mse-unbiased"] = TurboQuantConfig(bits=3, unbiased=True)
    for bits in (2,) if quick else (2, 3):
        split = quarter_split(bits, head_dim)
        code_bits = bits_per_value(split, head_dim, include_norms=False)
        selects = ("head", "layer", "first") if bits == 2 else ("head", "first")
        for select in ("head",) if quick else selects:
            out[f"tq{code_bits:g}-mse-{select}"] = TurboQuantConfig(
                bits=bits, outlier=split, outlier_select=select)
    return out


# ---------------------------------------------------------------------------- measurements


@functools.partial(jax.jit, static_argnames=("config", "kind", "prompt"))
def cached_nll(params, windows_NT, config: GPTConfig, kind, prompt: int = PROMPT):
    """[N, T-1-prompt] NLL of each next token after the prompt: a prompt-token prefill, then
    one token at a time through a `kind` cache."""
    N, T = windows_NT.shape
    cache = make_cache(config, N, T, kind)
    _, cache = apply(params, windows_NT[:, :prompt], config, cache=cache)

    def step(cache, t):
        tok_N1 = jax.lax.dynamic_slice_in_dim(windows_NT, t, 1, axis=1)
        logits_N1V, cache = apply(params, tok_N1, config, cache=cache)
        target_N = jax.lax.dynamic_index_in_dim(windows_NT, t + 1, axis=1, keepdims=False)
        logp_NV = jax.nn.log_softmax(logits_N1V[:, 0])
        return cache, -jnp.take_along_axis(logp_NV, target_N[:, None], -1)[:, 0]

    _, nll_TN = jax.lax.scan(step, cache, jnp.arange(prompt, T - 1))
    return nll_TN.T


@functools.partial(jax.jit, static_argnames=("config", "prompt"))
def reference_nll(params, windows_NT, config: GPTConfig, prompt: int = PROMPT):
    """The same NLL from one cache-free forward: what the float32 cache must reproduce."""
    logits, _ = apply(params, windows_NT[:, :-1], config)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, windows_NT[:, 1:, None], -1)[:, prompt:, 0]


def queries_and_keys(params, config: GPTConfig, tokens_BT):
    """Per layer (q, k) as [B*H, T, head_dim] rows exactly as attention sees them (after
    RoPE), by running the model's own Block modules one layer at a time."""
    B, T = tokens_BT.shape
    D, H = config.n_embd, config.n_head
    pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = params["wte"]["embedding"][tokens_BT].astype(config.dtype)
    if config.pos_embedding == "learned":
        x = x + params["wpe"]["embedding"][pos_BT].astype(config.dtype)
    elif config.pos_embedding == "sinusoidal":
        x = x * token_embedding_scale(config) + positions.sinusoidal(pos_BT, D).astype(
            config.dtype)
    out = []
    for i in range(config.n_layer):
        layer = params["h"][str(i)]
        h = Norm(config).apply({"params": layer["ln_1"]}, x) if config.norms_sublayer_inputs \
            else x
        c_attn = layer["attn"]["c_attn"]
        qkv = h @ c_attn["kernel"] + c_attn.get("bias", 0.0)
        q, k, _ = (a.reshape(B, T, H, D // H) for a in jnp.split(qkv, 3, axis=-1))
        if config.pos_embedding == "rope":
            q = positions.apply_rope(q, pos_BT, config.rope_base)
            k = positions.apply_rope(k, pos_BT, config.rope_base)
        out.append((heads_to_rows(q), heads_to_rows(k)))
        x, _ = Block(config).apply({"params": layer}, x, pos_BT, i, None)
    return out


def score_error(qk_layers, config: GPTConfig, tq: TurboQuantConfig) -> dict:
    """Scores from key codes vs exact q·k (both / sqrt(d)) over causal pairs, all layers;
    outlier channels selected from the first PROMPT keys, as a cache's prefill does."""
    sums = np.zeros(3)  # squared error, squared deviation, total variation
    for layer, (q_NTD, k_NTD) in enumerate(qk_layers):
        sums += np.asarray(_score_sums(q_NTD, k_NTD, config, tq, layer))
    N, T, _ = qk_layers[0][0].shape
    rows = N * T * len(qk_layers)
    return {"score_rel_rmse": float((sums[0] / sums[1]) ** 0.5),
            "attention_tv": float(sums[2] / rows)}


# one program per kind and layer: eagerly, each of the quantizer's ops compiled on its own
# (--quick: 332 compiles, most of them these)
@functools.partial(jax.jit, static_argnames=("config", "tq", "layer"))
def _score_sums(q_NTD, k_NTD, config: GPTConfig, tq: TurboQuantConfig, layer: int):
    N, T, d = q_NTD.shape
    B, prompt = N // config.n_head, min(PROMPT, T)
    prompt_BTHD = rows_to_heads(k_NTD[:, :prompt], B)
    cache = make_cache(config, B, prompt, tq)
    keys, _ = cache.write(layer, prompt_BTHD, prompt_BTHD).quantizers(layer)
    approx_NTS = keys.scores(keys.prepare_query(q_NTD), keys.quantize(k_NTD))
    exact = jnp.einsum("NTD,NSD->NTS", q_NTD, k_NTD) * d**-0.5
    approx = approx_NTS * d**-0.5
    mask = jnp.tril(jnp.ones((T, T), bool))
    mean = jnp.sum(jnp.where(mask, exact, 0.0)) / (mask.sum() * exact.shape[0])
    sq_err = jnp.sum(jnp.where(mask, approx - exact, 0.0) ** 2)
    sq_dev = jnp.sum(jnp.where(mask, exact - mean, 0.0) ** 2)
    p = jax.nn.softmax(jnp.where(mask, exact, -jnp.inf), -1)
    p_hat = jax.nn.softmax(jnp.where(mask, approx, -jnp.inf), -1)
    return jnp.stack([sq_err, sq_dev, 0.5 * jnp.sum(jnp.abs(p - p_hat))])


def greedy_tokens(params, config: GPTConfig, prompts, new_tokens: int, kind) -> np.ndarray:
    return np.asarray(generate(params, config, prompts, max_new_tokens=new_tokens,
                               key=jax.random.key(0), temperature=0.0, kv_cache=kind))


# ---------------------------------------------------------------------------- the experiment


def model_under_test(quick: bool, ckpt: str | None, work: Path) -> str:
    """The checkpoint folder of the model to test."""
    if ckpt:
        return ckpt
    data = shakespeare_data(work)
    if quick:  # head dim 64 like GPT-2's, 1 layer of 1 head: seconds to train
        cfg = TrainConfig(model=GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=64),
                          data=str(data), batch_size=2, max_steps=10, warmup_steps=1, lr=3e-3,
                          min_lr=3e-4, eval_every=10**9, eval_batches=2,
                          final_eval_batches=2, ckpt_every=10**9,
                          sample_tokens=0, peak_flops=1.0)
        name = "kvq-tiny"
    else:
        from eval.positions import recipe

        cfg = recipe(False, data)
        name = "pos-learned"  # the positions experiment's run: trained once for both
    return train_variant(cfg, work, name)["config"]["out"]


def run(quick: bool, out: Path, work: Path, ckpt: str | None = None) -> dict:
    code = common.code_hash()  # at the start: the model under test is trained by this code
    ckpt = model_under_test(quick, ckpt, work)
    config, params = sources.load_checkpoint(ckpt)
    T, d = config.block_size, config.head_dim
    val = np.asarray(data_lib.load_split(shakespeare_data(work), "val"))
    n_windows = 2 if quick else 16
    windows = jnp.asarray(val[: n_windows * T].reshape(n_windows, T).astype(np.int32))
    new_tokens = min(NEW_TOKENS, T - PROMPT - 16)
    prompts = [val[i * 997: i * 997 + PROMPT].tolist() for i in range(2 if quick else 8)]
    qk = queries_and_keys(params, config, windows[: 2 if quick else 8])
    reference = np.asarray(reference_nll(params, windows, config))
    float_tokens = greedy_tokens(params, config, prompts, new_tokens, "float32")

    rows = {}
    for name, kind in tqdm(kinds(d, quick).items(), desc="cache kinds"):
        nll = np.asarray(cached_nll(params, windows, config, kind))
        tokens = greedy_tokens(params, config, prompts, new_tokens, kind)
        equal = tokens == float_tokens
        first_diff = [int(np.argmin(r)) if not r.all() else new_tokens for r in equal]
        row = {
            "val_loss": float(nll.mean()), "perplexity": perplexity(float(nll.mean())),
            "greedy_match": float(equal.mean()),
            "tokens_before_first_difference": float(np.mean(first_diff)),
            # bytes of a 1024-token cache (a shape question: block_size only gates positions)
            "cache_bytes": make_cache(config.replace(block_size=max(T, BYTES_TOKENS)), 1,
                                      BYTES_TOKENS, kind).nbytes - 4,  # minus lengths
        }
        if isinstance(kind, TurboQuantConfig):
            row.update(score_error(qk, config, kind))
            spec = dict(kind=kind.key_quantizer)
            row["key_bits"] = bits_per_value(kind.key_spec, d, **spec)
            row["key_code_bits"] = bits_per_value(kind.key_spec, d, **spec, include_norms=False)
            row["value_bits"] = bits_per_value(kind.value_spec, d)
            row["value_code_bits"] = bits_per_value(kind.value_spec, d, include_norms=False)
        rows[name] = row
    fp32, fp16_bytes = rows["float32"], 2 * 2 * config.n_layer * BYTES_TOKENS * config.n_embd
    for row in rows.values():
        row["delta_loss_pct"] = 100 * (row["val_loss"] / fp32["val_loss"] - 1)
        row["compression_vs_fp16"] = fp16_bytes / row["cache_bytes"]
    result = {
        **common.provenance(code),
        "command": f"python -m eval.kv_quant{' --quick' if quick else ''}"
                   f"{f' --ckpt {ckpt}' if ckpt else ''}",
        "model": config.to_dict(), "checkpoint": str(ckpt), "scored_tokens": int(reference.size),
        "prompt_tokens": PROMPT,
        "float32_cache_vs_no_cache_max_abs_nll": float(
            np.abs(np.asarray(cached_nll(params, windows, config, "float32")) - reference).max()),
        "new_tokens": new_tokens, "fp16_cache_bytes": fp16_bytes, "rows": rows,
    }
    result["summary"] = summary(result)
    result["table"] = table(result)
    write_json(out / "kv_quant.json", result)
    plot(result, out / "kv_quant.png")
    print(result["table"])
    print(result["summary"]["text"])
    return result


def _splits(rows: dict) -> list[tuple[str, str]]:
    """(split with selected outliers, the plain rate below it) pairs present in rows."""
    return [(name, f"tq{name[2]}-mse") for name in rows
            if name.endswith("-mse-head") and f"tq{name[2]}-mse" in rows]


def summary(result: dict) -> dict:
    """The numbers behind claim 5's TurboQuant parts, in words; the verdict itself is
    eval.verdicts.turboquant's, computed where it is shown."""
    rows = result["rows"]
    three = rows["tq3-mse"]
    bar = rows[verdicts.ZERO_LOSS_REFERENCE]["greedy_match"]
    lossless = {n: r for n, r in rows.items() if n.startswith("tq") and verdicts.lossless(r, bar)}
    best = max(lossless.items(), key=lambda kv: kv[1]["compression_vs_fp16"], default=None)
    within = (f"{verdicts.ZERO_LOSS_PCT:g}% loss and the {verdicts.ZERO_LOSS_REFERENCE} "
              f"cache's {bar:.1%} greedy agreement")
    text = (f"At 3 bits (mse keys, {three['key_bits']:g} bits per value with the norm) "
            f"the cache is {three['compression_vs_fp16']:.1f}× smaller than a float16 "
            f"cache, val loss moves {three['delta_loss_pct']:+.2f}% and "
            f"{100 * three['greedy_match']:.0f}% of {result['new_tokens']} greedy tokens "
            f"match the float cache. ")
    if best:
        text += (f"The smallest cache within {within} is {best[0]} "
                 f"({best[1]['compression_vs_fp16']:.1f}× vs float16). ")
    else:
        text += f"No TurboQuant setting stayed within {within}. "
    split_wins = {}
    for split, plain in _splits(rows):
        split_wins[split] = rows[split]["score_rel_rmse"] < rows[plain]["score_rel_rmse"]
        text += (f"{split} (outliers chosen per head from the prompt) scores "
                 f"{rows[split]['score_rel_rmse']:.3f} rel. RMSE against {plain}'s "
                 f"{rows[plain]['score_rel_rmse']:.3f}. ")
    return {"text": text.strip(), "split_beats_lower_rate": split_wins}


def table(result: dict) -> str:
    lines = ["| cache | K bits/value: total (codes) | V total (codes) | val loss | Δ loss | "
             "greedy match | score rel. RMSE | attention TV | bytes @1024 | vs fp16 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        if "key_bits" in r:
            bits = (f"{r['key_bits']:g} ({r['key_code_bits']:g}) | "
                    f"{r['value_bits']:g} ({r['value_code_bits']:g})")
        else:
            bits = {"float32": "32 | 32", "bfloat16": "16 | 16"}[name]
        err = (f"{r['score_rel_rmse']:.3f} | {r['attention_tv']:.3f}" if "score_rel_rmse" in r
               else "0 | 0" if name == "float32" else "— | —")
        lines.append(f"| {name} | {bits} | {r['val_loss']:.4f} | {r['delta_loss_pct']:+.3f}% | "
                     f"{100 * r['greedy_match']:.1f}% | {err} | {r['cache_bytes']:,} | "
                     f"{r['compression_vs_fp16']:.2f}× |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    families = {"mse keys": lambda n: n.endswith("-mse") or "mse-head" in n,
                "prod keys": lambda n: n.endswith("-prod"),
                "split, channels 0..n-1": lambda n: n.endswith("-first"),
                "split, per layer": lambda n: n.endswith("-layer"),
                "mse, unbiased scale": lambda n: n.endswith("-unbiased")}
    for i, (label, member) in enumerate(families.items()):
        names = sorted((n for n in rows if n.startswith("tq") and member(n)),
                       key=lambda n: rows[n]["key_bits"])
        if not names:
            continue
        x = [rows[n]["key_bits"] for n in names]
        ax1.plot(x, [rows[n]["delta_loss_pct"] for n in names], "o-", color=f"C{i}",
                 label=label)
        ax2.plot(x, [rows[n]["score_rel_rmse"] for n in names], "o-", color=f"C{i}",
                 label=label)
        for n, xi in zip(names, x, strict=True):
            ax2.annotate(n[2:].split("-")[0], (xi, rows[n]["score_rel_rmse"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    if "bfloat16" in rows:  # not in a --quick run
        ax1.axhline(rows["bfloat16"]["delta_loss_pct"], color="k", ls=":",
                    label="bfloat16 cache")
    ax1.axhline(0, color="gray", lw=0.5)
    ax1.set_ylabel("val loss change vs float32 cache (%)")
    ax1.set_title(f"decoded token by token after a {result['prompt_tokens']}-token exact prefill",
                  fontsize=10)
    ax2.set_ylabel("score RMSE / score std (every causal pair, layer, head)")
    matches = sorted({f"{100 * r['greedy_match']:.0f}%" for n, r in rows.items()
                      if n.startswith("tq")})
    ax2.set_title(f"greedy tokens equal to the float32 cache's: {', '.join(matches)} "
                  f"({result['new_tokens']} tokens)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("key bits per value, float16 norms included")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_experiment_args(
        "python -m eval.kv_quant", __doc__, "a 1-layer toy, 2 windows", argv,
        more_arguments=lambda p: p.add_argument("--ckpt", help="a checkpoint to test instead"))
    run(args.quick, args.out, args.work, args.ckpt)


if __name__ == "__main__":
    main()
