"""Claim 5b: TurboQuant shrinks the KV cache 5-6x at ~3 bits per value "with zero accuracy loss".

    python -m eval.kv_quant [--quick] [--ckpt DIR] [--out eval/results] [--work out/claims]

On a model trained on Tiny Shakespeare (default: the positions experiment's `baby` run with
learned positions, context 256, head dim 64; trained here if missing), for the float32 and
bfloat16 caches and TurboQuant at {2, 2.5, 3, 3.5, 4} bits with mse or prod keys:

- val loss and perplexity scored token by token through the cache (a `lax.scan` of one-token
  decode steps, so every key and value read was quantized when written);
- greedy agreement with the float32 cache over 200 generated tokens (8 val prompts);
- attention-score error: the scores the cache computes from key codes (query rotated once)
  against the exact q·k, as RMSE over the scores' std, and the total-variation distance
  between the two attention distributions, over every causal pair of every layer and head;
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

from eval import verdicts
from eval.common import (
    parse_experiment_args,
    perplexity,
    shakespeare_data,
    train_variant,
    write_json,
)
from gpt2jax import checkpoint, positions
from gpt2jax.config import GPTConfig
from gpt2jax.generate import generate
from gpt2jax.kvcache import heads_to_rows, make_cache, turboquant_quantizers
from gpt2jax.model import Block, Norm, apply, token_embedding_scale, unstack_layers
from gpt2jax.quant.turboquant import TurboQuantConfig, bits_per_value, split_for_rate
from train import TrainConfig
from train import data as data_lib

RATES = (2, 2.5, 3, 3.5, 4)
QUICK_RATES = (2.5, 3)  # a split rate and the headline: each cache kind compiles twice
KEY_QUANTIZERS = ("mse", "prod")
FLOAT_KINDS = ("float32", "bfloat16")
BYTES_TOKENS = 1024


def tq_config(rate: float, key_quantizer: str, head_dim: int) -> TurboQuantConfig:
    """Integer rates as they are; 2.5 and 3.5 by an outlier split of the channels."""
    if rate == int(rate):
        return TurboQuantConfig(bits=int(rate), key_quantizer=key_quantizer)
    split = split_for_rate(rate, head_dim)
    return TurboQuantConfig(bits=split.bits_regular, key_quantizer=key_quantizer, outlier=split)


def kinds(head_dim: int, rates=RATES) -> dict[str, object]:
    out: dict[str, object] = {k: k for k in FLOAT_KINDS}
    for rate in rates:
        for kq in KEY_QUANTIZERS:
            out[f"tq{rate:g}-{kq}"] = tq_config(rate, kq, head_dim)
    return out


# ---------------------------------------------------------------------------- measurements


@functools.partial(jax.jit, static_argnames=("config", "kind"))
def cached_nll(params, windows_NT, config: GPTConfig, kind):
    """[N, T-1] NLL of each next token, decoding one token at a time through a `kind` cache."""
    N, T = windows_NT.shape
    cache = make_cache(config, N, T, kind)

    def step(cache, t):
        tok_N1 = jax.lax.dynamic_slice_in_dim(windows_NT, t, 1, axis=1)
        logits_N1V, cache = apply(params, tok_N1, config, cache=cache)
        target_N = jax.lax.dynamic_index_in_dim(windows_NT, t + 1, axis=1, keepdims=False)
        logp_NV = jax.nn.log_softmax(logits_N1V[:, 0])
        return cache, -jnp.take_along_axis(logp_NV, target_N[:, None], -1)[:, 0]

    _, nll_TN = jax.lax.scan(step, cache, jnp.arange(T - 1))
    return nll_TN.T


@functools.partial(jax.jit, static_argnames=("config",))
def reference_nll(params, windows_NT, config: GPTConfig):
    """The same NLL from one cache-free forward: what the float32 cache must reproduce."""
    logits, _ = apply(params, windows_NT[:, :-1], config)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, windows_NT[:, 1:, None], -1)[..., 0]


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
    for i, layer in enumerate(unstack_layers(params)["h"]):
        h = Norm(config).apply({"params": layer["ln_1"]}, x) if config.norm_placement == "pre" \
            else x
        c_attn = layer["attn"]["c_attn"]
        qkv = h @ c_attn["kernel"] + c_attn.get("bias", 0.0)
        q, k, _ = (a.reshape(B, T, H, D // H) for a in jnp.split(qkv, 3, axis=-1))
        if config.pos_embedding == "rope":
            q = positions.apply_rope(q, pos_BT, config.rope_base)
            k = positions.apply_rope(k, pos_BT, config.rope_base)
        out.append((heads_to_rows(q), heads_to_rows(k)))
        (x, _), _ = Block(config).apply({"params": layer}, (x, None), i, pos_BT)
    return out


def score_error(qk_layers, tq: TurboQuantConfig) -> dict:
    """Scores from key codes vs exact q·k (both / sqrt(d)) over causal pairs, all layers."""
    sq_err = sq_dev = tv = rows = 0.0
    for layer, (q_NTD, k_NTD) in enumerate(qk_layers):
        d = q_NTD.shape[-1]
        keys, _ = turboquant_quantizers(tq, d, layer)
        exact = jnp.einsum("NTD,NSD->NTS", q_NTD, k_NTD) * d**-0.5
        approx = keys.scores(keys.prepare_query(q_NTD), keys.quantize(k_NTD)) * d**-0.5
        T = exact.shape[-1]
        mask = jnp.tril(jnp.ones((T, T), bool))
        diff = jnp.where(mask, approx - exact, 0.0)
        mean = jnp.sum(jnp.where(mask, exact, 0.0)) / (mask.sum() * exact.shape[0])
        sq_err += float(jnp.sum(diff**2))
        sq_dev += float(jnp.sum(jnp.where(mask, exact - mean, 0.0) ** 2))
        p = jax.nn.softmax(jnp.where(mask, exact, -jnp.inf), -1)
        p_hat = jax.nn.softmax(jnp.where(mask, approx, -jnp.inf), -1)
        tv += float(0.5 * jnp.sum(jnp.abs(p - p_hat)))
        rows += exact.shape[0] * T
    return {"score_rel_rmse": (sq_err / sq_dev) ** 0.5, "attention_tv": tv / rows}


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
        cfg = TrainConfig(model=GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=128),
                          data=str(data), batch_size=4, max_steps=30, warmup_steps=3, lr=3e-3,
                          min_lr=3e-4, eval_every=10**9, eval_batches=2, ckpt_every=10**9,
                          sample_tokens=0, peak_flops=1.0)
        name = "kvq-tiny"
    else:
        from eval.positions import recipe

        cfg = recipe(False, data)
        name = "pos-learned"  # the positions experiment's run: trained once for both
    return train_variant(cfg, work, name)["config"]["out"]


def run(quick: bool, out: Path, work: Path, ckpt: str | None = None) -> dict:
    ckpt = model_under_test(quick, ckpt, work)
    config, params = checkpoint.load(ckpt)
    T = config.block_size
    val = np.asarray(data_lib.load_split(shakespeare_data(work), "val"))
    n_windows = 8 if quick else 64
    windows = jnp.asarray(val[: n_windows * T].reshape(n_windows, T).astype(np.int32))
    prompt_len = 16
    new_tokens = min(200, T - prompt_len - 16)
    prompts = [val[i * 997: i * 997 + prompt_len].tolist() for i in range(8)]
    qk = queries_and_keys(params, config, windows[: 4 if quick else 8])
    reference = np.asarray(reference_nll(params, windows, config))
    float_tokens = greedy_tokens(params, config, prompts, new_tokens, "float32")

    rows = {}
    rates = QUICK_RATES if quick else RATES
    for name, kind in tqdm(kinds(config.head_dim, rates).items(), desc="cache kinds"):
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
            row.update(score_error(qk, kind))
            spec = dict(kind=kind.key_quantizer)
            row["key_bits"] = bits_per_value(kind.key_spec, config.head_dim, **spec)
            row["key_code_bits"] = bits_per_value(kind.key_spec, config.head_dim, **spec,
                                                  include_norms=False)
            row["value_bits"] = bits_per_value(kind.value_spec, config.head_dim)
        rows[name] = row
    fp32, fp16_bytes = rows["float32"], 2 * 2 * config.n_layer * BYTES_TOKENS * config.n_embd
    for row in rows.values():
        row["delta_loss_pct"] = 100 * (row["val_loss"] / fp32["val_loss"] - 1)
        row["compression_vs_fp16"] = fp16_bytes / row["cache_bytes"]
    result = {
        "command": f"python -m eval.kv_quant{' --quick' if quick else ''}",
        "model": config.to_dict(), "checkpoint": str(ckpt), "scored_tokens": int(reference.size),
        "float32_cache_vs_no_cache_max_abs_nll": float(
            np.abs(np.asarray(cached_nll(params, windows, config, "float32")) - reference).max()),
        "new_tokens": new_tokens, "fp16_cache_bytes": fp16_bytes, "rates": rates, "rows": rows,
    }
    result["verdict"] = verdict(result)
    result["table"] = table(result)
    write_json(out / "kv_quant.json", result)
    plot(result, out / "kv_quant.png")
    print(result["table"])
    return result


def verdict(result: dict) -> dict:
    rows = result["rows"]
    three = rows["tq3-mse"]
    lossless = {n: r for n, r in rows.items() if n.startswith("tq") and verdicts.lossless(r)}
    best = max(lossless.items(), key=lambda kv: kv[1]["compression_vs_fp16"], default=None)
    summary = (f"At 3 bits (mse keys) the cache is {three['compression_vs_fp16']:.1f}× smaller "
               f"than a float16 cache, val loss moves {three['delta_loss_pct']:+.2f}% and "
               f"{100 * three['greedy_match']:.0f}% of {result['new_tokens']} greedy tokens "
               f"match the float cache. ")
    if best:
        summary += (f"The smallest cache within 0.1% loss and 99% greedy agreement is "
                    f"{best[0]} ({best[1]['compression_vs_fp16']:.1f}× vs float16).")
    else:
        summary += "No TurboQuant setting stayed within 0.1% loss and 99% greedy agreement."
    return {"summary": summary, "verdict": verdicts.turboquant(rows).outcome}


def table(result: dict) -> str:
    lines = ["| cache | bits/value K (codes) | val loss | Δ loss | greedy match | "
             "score rel. RMSE | attention TV | bytes @1024 | vs fp16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        bits = (f"{r['key_bits']:.2f} ({r['key_code_bits']:.2f})" if "key_bits" in r
                else {"float32": "32", "bfloat16": "16"}[name])
        err = (f"{r['score_rel_rmse']:.3f} | {r['attention_tv']:.3f}" if "score_rel_rmse" in r
               else "0 | 0" if name == "float32" else "— | —")
        lines.append(f"| {name} | {bits} | {r['val_loss']:.4f} | {r['delta_loss_pct']:+.2f}% | "
                     f"{100 * r['greedy_match']:.0f}% | {err} | {r['cache_bytes']:,} | "
                     f"{r['compression_vs_fp16']:.2f}× |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (kq, marker) in enumerate(zip(KEY_QUANTIZERS, ("o", "s"), strict=True)):
        names = [f"tq{r:g}-{kq}" for r in result["rates"]]
        x = [rows[n]["compression_vs_fp16"] for n in names]
        ax1.plot(x, [rows[n]["delta_loss_pct"] for n in names], f"{marker}-",
                 label=f"TurboQuant, {kq} keys")
        for n, xi in zip(names, x, strict=True):
            ax1.annotate(n.split("-")[0][2:] + "b", (xi, rows[n]["delta_loss_pct"]),
                         fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax2.plot(x, [rows[n]["score_rel_rmse"] for n in names], f"{marker}-", color=f"C{i}",
                 label=f"{kq} keys: score RMSE / score std")
        ax2.plot(x, [rows[n]["attention_tv"] for n in names], f"{marker}:", color=f"C{i}",
                 label=f"{kq} keys: attention TV distance")
    for name, marker in (("float32", "k*"), ("bfloat16", "kD")):
        ax1.plot(rows[name]["compression_vs_fp16"], rows[name]["delta_loss_pct"], marker,
                 label=name)
    ax1.axhline(0, color="gray", lw=0.5)
    ax1.set_xlabel("cache size: float16 bytes / bytes")
    ax1.set_ylabel("val loss change vs float32 cache (%)")
    ax1.set_title("quality vs compression (token-by-token through the cache)")
    ax2.set_xlabel("cache size: float16 bytes / bytes")
    ax2.set_ylabel("attention error (every causal pair, layer, head)")
    matches = sorted({f"{100 * r['greedy_match']:.0f}%" for n, r in rows.items()
                      if n.startswith("tq")})
    ax2.set_title(f"greedy tokens equal to the float32 cache's: {', '.join(matches)} "
                  f"({result['new_tokens']} tokens)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_experiment_args(
        "python -m eval.kv_quant", __doc__, "a 1-layer toy, 8 windows", argv,
        more_arguments=lambda p: p.add_argument("--ckpt", help="a checkpoint to test instead"))
    run(args.quick, args.out, args.work, args.ckpt)


if __name__ == "__main__":
    main()
