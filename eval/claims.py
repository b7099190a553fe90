"""The article's six claims, measured: one command, one report.

    python -m eval.claims [--quick] [--out eval/results] [--work out/claims] [--rerun]
    python -m eval.claims --report-only    # REPORT.md and README's table from the JSON

Runs the experiment behind each claim and writes REPORT.md to --out: per claim the claim in
one sentence, what was measured and how, a table, the plot, a verdict (holds / holds in
part / does not hold / understates / overstates) by the rule in eval/verdicts.py, printed with
its thresholds, and the command that reproduces it. Without --quick an experiment
whose JSON is already in --out is read, not rerun (--rerun forces it: the full set takes
about two hours on a 2-core CPU); --quick runs every experiment on toy models in a few
minutes (a smoke test: its numbers show that the pipeline works, not what is true).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from eval import verdicts as rules
from eval.bench_decode import DecodeResult
from eval.bench_serve import ServeResult
from eval.common import README, RESULTS, read_record, write_readme_block
from eval.decode_growth import GrowthResult
from eval.decode_growth import table as growth_table
from eval.kv_quant import summary as kv_quant_summary
from eval.verdicts import Verdict, fmt_seeds, per_seed
from train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Section:
    how: str  # what was measured and how
    table: str  # Markdown
    verdict: Verdict  # computed by the claim's rule in eval/verdicts.py
    rule: str  # that rule in words, with its thresholds
    why: str  # the numbers behind the verdict
    brief: str  # the key numbers, one line, for the README's table


@dataclasses.dataclass(frozen=True)
class Claim:
    title: str
    statement: str
    experiments: tuple[tuple[str, str], ...]  # (module, JSON file it writes)
    render: Callable[[dict[str, dict | DecodeResult]], Section]
    # (module, JSON glob): checks run by their own command, not by this one (too slow for
    # the full run's budget); rendered when their JSON is in the results folder
    checks: tuple[tuple[str, str], ...] = ()

    def outputs(self, out: Path) -> list[tuple[str, str]]:
        """(module, JSON name) of the experiments, then of the checks present in `out`."""
        return list(self.experiments) + [(module, path.name) for module, pattern in self.checks
                                         for path in sorted(out.glob(pattern))]


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


PLACEMENTS = ("pre", "post", "deepnorm")
PLACEMENT_NAMES = {"pre": "pre", "post": "post", "deepnorm": "DeepNorm", "double": "Double Norm"}


def _fmt_losses(values: list[float | None], digits: int = 3) -> str:
    """Per-seed val losses as mean ± sd, with the diverged seeds counted apart."""
    finite = [x for x in values if x is not None]
    nan = len(values) - len(finite)
    text = fmt_seeds(finite, digits) if finite else "NaN"
    return f"{text} ({nan} of {len(values)} NaN)" if finite and nan else text


def _f(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------- renderers


def render_lora(results: dict[str, dict]) -> Section:
    r = results["lora_rank_sweep.json"]
    plan = r["plan"]
    by = {m: {run["rank"]: per_seed(run) for run in r["runs"] if run["method"] == m}
          for m in ("lora", "rslora")}
    verdict = rules.lora_vs_rslora(by["lora"], by["rslora"])
    rows = [[run["method"], run["rank"], f"{run['scale']:.4g}", f"{run['trainable']:,}",
             _fmt_losses(per_seed(run), 4), f"{r['base_val_loss'] - run['val_loss']:+.4f}",
             _f(run["delta_norm"], 3)] for run in r["runs"]]
    lo, hi = min(by["lora"]), max(by["lora"])
    norms = {m: {run["rank"]: run["delta_norm"] for run in r["runs"] if run["method"] == m}
             for m in by}
    gap = rules.difference(by["rslora"][hi], by["lora"][hi])
    why = (f"From rank {lo} to {hi}, LoRA's held-out loss went {_fmt_losses(by['lora'][lo])} → "
           f"{_fmt_losses(by['lora'][hi])} and its ‖ΔW‖ changed "
           f"{norms['lora'][hi] / norms['lora'][lo]:.2f}×; rsLoRA's went "
           f"{_fmt_losses(by['rslora'][lo])} → {_fmt_losses(by['rslora'][hi])} with ‖ΔW‖ "
           f"{norms['rslora'][hi] / norms['rslora'][lo]:.2f}×. At rank {hi} rsLoRA minus LoRA "
           f"is {gap.delta:+.4f} nats (margin {gap.margin:.4f}; the base starts at "
           f"{_f(r['base_val_loss'])}).")
    # sweeps before the fourth session gave the base minutes, not steps
    budget = (f"{plan['base_minutes']:g} minutes" if plan.get("base_minutes")
              else f"{plan['base_steps']} steps")
    how = (f"A base ({r['base']}, {budget}) trained on the first 80% of "
           f"Tiny Shakespeare is fine-tuned "
           f"on the last 20% (unseen plays) with adapters on q and v at ranks "
           f"{', '.join(str(k) for k in sorted(by['lora']))}, "
           f"alpha {plan['alpha']}, lr {plan['lr']}, {plan['steps']} steps of "
           f"{plan['batch_size']}×{r['block_size']} tokens, same data order, through "
           f"`python -m train --lora-rank`. Val loss on the held-out part; ‖ΔW‖ = ‖s·A·B‖_F "
           f"(of the first seed).")
    brief = (f"val loss at ranks {lo} → {hi}: LoRA {_fmt_losses(by['lora'][lo])} → "
             f"{_fmt_losses(by['lora'][hi])}, rsLoRA {_fmt_losses(by['rslora'][lo])} → "
             f"{_fmt_losses(by['rslora'][hi])}")
    header = ["method", "rank", "scale s", "trainable", "val loss", "gain vs base", "‖ΔW‖"]
    return Section(how, _md_table(header, rows), verdict, rules.RULES["lora"], why, brief)


def render_positions(results: dict[str, dict]) -> Section:
    r = results["positions.json"]
    T = r["block_size"]
    rows = []
    for scheme, run in r["runs"].items():
        beyond = run.get("mean_loss_beyond_T")
        rows.append([scheme, f"{run['position_params']:,}", _fmt_losses(per_seed(run), 4),
                     _f(run.get("mean_loss_first_T")),
                     "cannot (no embedding past T)" if beyond is None else _f(beyond)])
    v = r["summary"]
    pen = v["extrapolation_penalty"]
    learned, sinusoidal, rope = (per_seed(r["runs"][s])
                                 for s in ("learned", "sinusoidal", "rope"))
    verdict = rules.positions(learned, sinusoidal, rope, [pen["rope"]])
    gap = rules.difference(rope, learned)
    gap_sin = rules.difference(rope, sinusoidal)
    why = (f"Same {r['tokens_per_run']:,} tokens: val loss learned {_fmt_losses(learned)}, "
           f"sinusoidal {_fmt_losses(sinusoidal)}, RoPE {_fmt_losses(rope)} (RoPE − learned "
           f"{gap.delta:+.4f}, margin {gap.margin:.4f}; RoPE − sinusoidal {gap_sin.delta:+.4f}, "
           f"margin {gap_sin.margin:.4f}); learned positions cost "
           f"{r['runs']['learned']['position_params']:,} parameters, the others none. On "
           f"windows of 2T = {2 * T} tokens, the loss at positions past T rises by "
           f"{pen['rope']:+.3f} (RoPE) and {pen['sinusoidal']:+.3f} (sinusoidal) over the "
           f"second half of the first T (the first seed's model); learned positions cannot be "
           f"run there at all.")
    how = (f"The same model trained three times, changing only `pos_embedding`, "
           f"on Tiny Shakespeare at context T = {T}; val loss on the whole val split, and "
           f"loss by token position on val windows of 2T.")
    brief = (f"val loss RoPE {_fmt_losses(rope)}, learned {_fmt_losses(learned)}, sinusoidal "
             f"{_fmt_losses(sinusoidal)}; past 2× context RoPE {pen['rope']:+.3f} nats, "
             f"sinusoidal {pen['sinusoidal']:+.3f}, learned cannot run")
    header = ["positions", "params added", f"val loss (T={T})", "mean loss, positions < T",
              "mean loss, positions T..2T"]
    return Section(how, _md_table(header, rows), verdict, rules.RULES["positions"], why, brief)


def render_tying(results: dict[str, dict]) -> Section:
    r = results["tying.json"]
    rows = [[t["preset"], f"{t['tied']:,}", f"{t['untied']:,}",
             f"{t['wte_share_tied_pct']:.1f}%", f"{t['saved_by_tying_pct']:.1f}%"]
            for t in r["table"]]
    v = r["summary"]
    small, xl = v["gpt2_wte_share_pct"], v["gpt2-xl_wte_share_pct"]
    verdict = rules.tying(small, xl)
    runs = r["runs"]
    tied, untied = per_seed(runs["tied"]), per_seed(runs["untied"])
    gap = rules.difference(untied, tied)
    why = (f"The token embedding is {small:.1f}% of GPT-2 small (tying saves that share), and "
           f"{xl:.1f}% of GPT-2 XL at 1.56B against the article's \"< "
           f"{rules.TYING_LARGE_MAX:g}%\" (a vocabulary of 50,257 × 1,600 dims); it falls "
           f"below {rules.TYING_LARGE_MAX:g}% only for models far wider and "
           f"deeper. Training (not part of the claim): untied {_fmt_losses(untied)} vs tied "
           f"{_fmt_losses(tied)} val loss at the same tokens (Δ {gap.delta:+.4f}, margin "
           f"{gap.margin:.4f}), for {runs['untied']['params'] - runs['tied']['params']:,} "
           f"more parameters.")
    how = ("Parameter counts from the shapes of every preset (nothing allocated); then the "
           "baby preset trained tied and untied on the same tokens.")
    brief = (f"wte is {small:.1f}% of GPT-2 small and {xl:.1f}% of GPT-2 XL (1.56B); val "
             f"loss untied {_fmt_losses(untied)} vs tied {_fmt_losses(tied)}")
    header = ["preset", "tied", "untied", "wte share (tied)", "saved by tying"]
    return Section(how, _md_table(header, rows), verdict, rules.RULES["tying"], why, brief)


def _variant_runs(r: dict, results: dict[str, dict]) -> list[tuple[str, dict, dict]]:
    """(command, grid, long) of every `eval.norms --placements` run (norms_variant_*.json):
    at norms.json's settings, with pre-LN trained beside the variants (same code), or refused."""
    found = []
    for name in sorted(n for n in results if n.startswith("norms_variant_")):
        extra = results[name]
        # as configs: a field added since (at its default) is no other setting
        same = TrainConfig.from_dict(extra["train"]) == TrainConfig.from_dict(r["train"])
        if not same or extra["long_steps"] != r["long_steps"]:
            raise ValueError(f"{name} was trained at other settings than norms.json: rerun "
                             f"`{extra['command']}` on the same recipe")
        found.append((extra["command"], *_grid_and_long(extra)))
    return found


def _grid_and_long(r: dict) -> tuple[dict, dict]:
    """An eval.norms result as `rules.norms` takes it: {placement: {(lr, warmup): per-seed
    losses}} and {placement: per-seed losses of the long runs}."""
    grid = {p: {(run["lr"], run["warmup"]): per_seed(run) for run in r["runs"]
                if run["placement"] == p} for p in r["long_runs"]}
    return grid, {p: per_seed(row) for p, row in r["long_runs"].items()}


def _grid_rows(grid: dict, long: dict, lrs: list[float], long_label: str,
               placements) -> list[list]:
    rows = [[p, warmup, *(_fmt_losses(grid[p][(lr, warmup)]) for lr in lrs)]
            for p in placements for warmup in sorted({w for _, w in grid[p]})]
    return rows + [[p, long_label, _fmt_losses(long[p]), *[""] * (len(lrs) - 1)]
                   for p in placements]


def render_norms(results: dict[str, dict]) -> Section:
    r = results["norms.json"]
    v = r["summary"]
    lrs = sorted({run["lr"] for run in r["runs"]})
    long_label = f"50 ({r['long_steps']} steps, lr 1e-3)"
    grid, long = _grid_and_long(r)
    variants = _variant_runs(r, results)
    rows = _grid_rows(grid, long, lrs, long_label, PLACEMENTS)
    for _, vgrid, vlong in variants:  # pre-LN's own runs there are in the text
        rows += _grid_rows(vgrid, vlong, lrs, long_label, [p for p in vlong if p != "pre"])
    search = results.get("norms_regime.json")
    regime = None if search is None else {p: arm["val_losses"]
                                          for p, arm in search["arms"].items()}
    verdict = rules.norms(grid, long, regime)
    seeds = {p: [x for runs in grid[p].values() for x in runs] for p in PLACEMENTS}
    failed = {p: sum(not rules.trained(x) for x in seeds[p]) for p in PLACEMENTS}
    unit = v["grad_last_over_rest_deepest"]["unit_embeddings"]
    gpt2 = v["grad_last_over_rest_deepest"]["gpt2_init"]
    depth = max(r["init_grad_norms"], key=int)
    why = (f"Of {len(seeds['pre'])} short runs per placement, {failed['pre']} pre-LN, "
           f"{failed['post']} post-LN and {failed['deepnorm']} DeepNorm runs ended at or above "
           f"the unigram loss ({rules.UNIGRAM_LOSS}) or diverged ({v['diverged_runs']} NaN in "
           f"all). Trained {r['long_steps']} steps: pre {_fmt_losses(long['pre'])}, post "
           f"{_fmt_losses(long['post'])}, DeepNorm {_fmt_losses(long['deepnorm'])}. Gradients "
           f"at init (depth {depth}), last layer over the median of the others: with unit-scale "
           f"embeddings (Xiong et al., arXiv:2002.04745, §3) pre {unit['pre']:.2f}, post "
           f"{unit['post']:.2f}, DeepNorm {unit['deepnorm']:.2f}; at GPT-2's init (embeddings "
           f"std 0.02) post-LN's largest gradient is the first layer's instead, "
           f"{v['grad_first_over_rest_gpt2_init']['post']:.1f}× the rest, and the last's "
           f"ratio is {gpt2['post']:.2f}.")
    why += " " + _tradeoff_text(grid, long, r["train"]["model"]["n_layer"], variants)
    if search is not None:
        why += " " + _regime_text(search)
    for name in sorted(n for n in results if n.startswith("norms_regime_d")):
        why += " A deeper check, outside the verdict: " + _regime_text(results[name])
    train = r["train"]
    m = train["model"]
    how = (f"Per-layer gradient norms at init for pre-LN, post-LN and DeepNorm (depths "
           f"{' and '.join(r['init_grad_norms'])}, width {r['grad_width']}); then a "
           f"{m['n_layer']}-layer, {m['n_embd']}-dim model "
           f"trained {train['max_steps']} steps of {train['batch_size']}×{m['block_size']} "
           f"tokens at each learning rate, with and without 50 warmup steps, no gradient "
           f"clipping; and each placement trained {r['long_steps']} steps. Final val loss.")
    brief = (f"{m['n_layer']} layers, no clipping: runs at or above the unigram loss or "
             f"diverged: pre {failed['pre']}, post {failed['post']}, DeepNorm "
             f"{failed['deepnorm']} of {len(seeds['pre'])}; {r['long_steps']} steps: pre "
             f"{_fmt_losses(long['pre'])}, post {_fmt_losses(long['post'])}, DeepNorm "
             f"{_fmt_losses(long['deepnorm'])}")
    if search is not None and search["chosen"] is not None:
        arms, chosen = search["arms"], search["chosen"]
        brief += (f"; where all train ({search['depth']} layers, lr {chosen['lr']:g}, warmup "
                  f"{chosen['warmup']}): pre {_fmt_losses(arms['pre']['val_losses'])}, post "
                  f"{_fmt_losses(arms['post']['val_losses'])}")
    header = ["placement", "warmup steps", *(f"lr {lr:g}" for lr in lrs)]
    return Section(how, _md_table(header, rows), verdict, rules.RULES["norms"], why, brief)


def _tradeoff_text(grid: dict, long: dict, depth: int, variants: list) -> str:
    """Outside the verdict: whether each variant breaks the trade-off
    (eval.verdicts.breaks_tradeoff), each judged against the pre- (and post-) LN runs of its
    own run: DeepNorm in norms.json's, the others in their norms_variant_*.json."""
    def judged(grid, long, p):
        runs = [x for seeds in grid[p].values() for x in seeds]
        failed = sum(not rules.trained(x) for x in runs)
        return (f"{PLACEMENT_NAMES[p]} {rules.breaks_tradeoff(grid, long, p)} ({failed} of "
                f"{len(runs)} short runs failed; long runs {_fmt_losses(long[p])})")

    found = [judged(grid, long, "deepnorm")]
    for command, vgrid, vlong in variants:
        pre = [x for seeds in vgrid["pre"].values() for x in seeds]
        pre_failed = sum(not rules.trained(x) for x in pre)
        found += [judged(vgrid, vlong, p) + f" against `{command}`'s own pre-LN runs "
                  f"({pre_failed} of {len(pre)} short runs failed; long runs "
                  f"{_fmt_losses(vlong['pre'])})"
                  + ("" if "post" in vlong else ", post-LN not rerun there")
                  for p in vlong if p not in ("pre", "post")]
    return (f"Outside the verdict, at {depth} layers: does a variant break the trade-off (no "
            f"more short runs fail than pre-LN's, and the long runs end no higher than the "
            f"lower of pre and post where they train, by the seed rule)? "
            + "; ".join(found) + ".")


def _regime_text(search: dict) -> str:
    """What `eval.norms_regime` found: where post-LN trains, and the seeded comparison there."""
    grid = search["grid"]
    post = [r for r in grid if r["placement"] == "post"]
    trains = [f"lr {r['lr']:g} warmup {r['warmup']}" for r in post if rules.trained(r["val_loss"])]
    warmups_at: dict[float, list[int]] = {}
    for r in post:
        warmups_at.setdefault(r["lr"], []).append(r["warmup"])
    settings = "; ".join(f"lr {lr:g} with warmup {' / '.join(map(str, ws))}"
                         for lr, ws in sorted(warmups_at.items()))
    text = (f"Searching where post-LN trains ({search['depth']} layers, {search['steps']} "
            f"steps; {settings}; one seed): post-LN trained at "
            f"{', '.join(trains) if trains else 'none of them'}")
    gaps = [f"{c['post'] - c['pre']:+.3f} at lr {lr:g} warmup {warmup}"
            for (lr, warmup), c in rules.losses_by_cell(grid).items()
            if rules.trained(c.get("pre")) and rules.trained(c.get("post"))]
    if gaps:
        text += f" (post − pre, one seed each: {', '.join(gaps)})"
    chosen = search["chosen"]
    if chosen is None:
        return text + "; no setting trained every placement, so nothing is compared there."
    arms = {p: arm["val_losses"] for p, arm in search["arms"].items()}
    text += (f". At lr {chosen['lr']:g}, warmup {chosen['warmup']} (every placement trains; "
             f"post-LN's best): pre {_fmt_losses(arms['pre'])}, post {_fmt_losses(arms['post'])}, "
             f"DeepNorm {_fmt_losses(arms['deepnorm'])}")
    if not all(rules.trained(x) for x in arms["pre"] + arms["post"]):
        return text + "; a seed of pre- or post-LN did not train there."
    diff = rules.difference(arms["post"], arms["pre"])
    if min(len(arms["post"]), len(arms["pre"])) < 2:  # no seed spread: nothing to judge by
        return text + f"; post − pre {diff.delta:+.3f} (one seed: no spread to judge it by)."
    text += f"; post − pre {diff.delta:+.3f} against a margin of {diff.margin:.3f}."
    return text + _layer_grads_text(search)


def _layer_grads_text(search: dict) -> str:
    """Per-layer gradient norms over training, from `eval.norms_regime`'s probes."""
    probes = {p: arm["layer_grads"] for p, arm in search["arms"].items() if "layer_grads" in arm}
    if not probes:
        return ""
    spreads = []
    for placement, probe in probes.items():
        norms = [max(n) / min(n) for n in probe["norms"]]
        last = probe["norms"][-1]
        spreads.append(f"{PLACEMENT_NAMES[placement]} {norms[0]:.1f} → {max(norms):.1f} "
                       f"(largest) → {norms[-1]:.1f}, largest at the end in layer "
                       f"{last.index(max(last))}")
    same = all(abs(probe["val_loss"] - search["arms"][p]["val_losses"][0]) < 1e-6
               for p, probe in probes.items())
    steps = next(iter(probes.values()))["steps"]
    return (f" Per-layer gradient norms over training (first seed, {len(steps)} probes from "
            f"step 0 to {steps[-1]}, 8 fixed val rows), largest layer over smallest at init → "
            f"over the run → at the end: {'; '.join(spreads)}. "
            + ("The probe runs end at the arms' first-seed val loss: they are those runs."
               if same else "The probe runs do NOT end at the arms' first-seed val loss."))


def render_kv(results: dict[str, dict | DecodeResult]) -> Section:
    d = results["bench_decode.json"]
    q = results["kv_quant.json"]
    lengths = sorted({f.length for f in d.sweep})
    speed_rows = [[L, f"{d.speedup('gpt2jax', 1, L):.1f}×", f"{d.speedup('hf', 1, L):.1f}×",
                   f"{d.cache_bytes(1, L).arrays:,} = {d.cache_bytes(1, L).formula:,}"]
                  for L in lengths]
    table = _md_table(["tokens", "cache speed-up (gpt2jax)", "cache speed-up (HF)",
                       "cache bytes: measured = formula"], speed_rows)
    table += "\n\n" + q["table"]
    g: GrowthResult = results["decode_growth.json"]
    table += "\n\nPer generated token against the sequence's length (`eval.decode_growth`):\n\n"
    table += growth_table(g)
    speedups = [d.speedup("gpt2jax", 1, L) for L in lengths]
    exact = all(size.arrays == size.formula for size in d.float32_cache_bytes)
    growth = (g.fit("cache"), g.fit("nocache"))
    verdict = rules.kv_cache(speedups, exact, q["rows"], growth)
    lo, hi = rules.CACHE_SPEEDUP_BAND
    in_band = [c.length for c in g.cells if lo <= g.speedup(c.length) <= hi]
    why = (f"The float cache makes batch-1 decoding {speedups[0]:.1f}× (at {lengths[0]} "
           f"tokens) to {speedups[-1]:.1f}× (at {lengths[-1]}) faster than recomputing, "
           f"against \"around 2×\" ({lo}–{hi}×): {verdict.parts['around 2× faster']}; its "
           f"bytes {'equal' if exact else 'differ from'} the formula's. Per generated token, "
           f"the T-term of the fitted a + b·T is {100 * growth[0].share:.0f}% of the time at "
           f"T = {growth[0].longest} with the cache and {100 * growth[1].share:.0f}% "
           f"recomputing: O(T²) → O(T) {verdict.parts['O(T²) → O(T)']}. The article's "
           f"{g.example.length}-token example runs {g.example.speedup:.2f}× faster with the "
           f"cache; the per-token speed-up is in the {lo}–{hi}× band at "
           + (f"T = {', '.join(map(str, in_band))}. " if in_band else "no length measured. ")
           + kv_quant_summary(q)["text"])
    how = (f"Decode speed with and without the cache, {d.preset} shape, against Hugging "
           f"Face in the same run (`eval.bench_decode`); the time per generated token against "
           f"the sequence's length, with and without the cache, fitted as a + b·T, and the "
           f"article's 15-token example run as written (`eval.decode_growth`); TurboQuant "
           f"caches on a model trained "
           f"on Tiny Shakespeare (`{q['command']}`), run as the paper runs them (exact "
           f"prefill, codes stored, each decoded token exact to itself): val loss scored token "
           f"by token through the quantized cache, greedy agreement with the float cache, "
           f"attention-score error, and bytes from the arrays.")
    three = q["rows"][rules.TQ_SETTING]
    brief = (f"cache {speedups[0]:.1f}× ({lengths[0]} tokens) to {speedups[-1]:.1f}× "
             f"({lengths[-1]}) faster at batch 1 ({g.example.speedup:.1f}× for the article's "
             f"{g.example.length} tokens), per-token time {100 * growth[0].share:.0f}% grown "
             f"by T = {growth[0].longest} with the cache and {100 * growth[1].share:.0f}% "
             f"without, bytes {'=' if exact else '≠'} formula; "
             f"{rules.TQ_SETTING} {three['compression_vs_fp16']:.2f}× smaller than fp16 (norms "
             f"counted), {three['delta_loss_pct']:+.2f}% loss, "
             f"{100 * three['greedy_match']:.0f}% greedy tokens equal")
    if "bench_serve.json" in results:  # what the smaller cache buys: capacity
        serve = results["bench_serve.json"]
        table += "\n\nUnder load (`eval.bench_serve`), same cache budget:\n\n" + _md_table(
            ["cache", "bytes per sequence", "sequences in the budget",
             "tok/s at 64 clients", "× float32"], capacity_rows(serve))
        brief += "; " + capacity_brief(serve)
    return Section(how, table, verdict, rules.RULES["kv"], why, brief)


def capacity_rows(serve: ServeResult) -> list[list]:
    """Per cache kind: bytes per sequence of the benchmark's context, slots in the budget,
    output tokens/s at the most clients, and that over float32's."""
    most = max(f.clients for f in serve.figures)
    base = serve.figure("float32", most).tok_s
    return [[kind, f"{serve.bytes_per_slot[kind]:,}", serve.figure(kind, most).slots,
             f"{serve.figure(kind, most).tok_s:.1f}",
             f"{serve.figure(kind, most).tok_s / base:.2f}×"] for kind in serve.bytes_per_slot]


def capacity_brief(serve: ServeResult) -> str:
    most = max(f.clients for f in serve.figures)
    f32, tq = serve.figure("float32", most), serve.figure("tq3", most)
    return (f"in {serve.budget_bytes / 2**20:.0f} MiB of cache tq3 holds {tq.slots} "
            f"sequences of {serve.context} tokens to float32's {f32.slots}, "
            f"{tq.tok_s / f32.tok_s:.2f}× the tok/s at {most} clients")


def render_int8(results: dict[str, dict]) -> Section:
    r = results["quantization.json"]
    variants = r["variants"]
    change = lambda row: rules.fmt_pct(rules.per_seed_pct(row))  # noqa: E731
    rows = [[name, rules.fmt_seeds(rules.per_seed(row), 4), change(row),
             f"{row['bytes']:,}", f"{row['size_vs_float32']:.3f}"]
            for name, row in variants.items()]
    skipped = variants["int8 per-channel (norms float)"]
    # the article's claim is about int8: the verdict reads the int8-norm variants only; a
    # lower width is reported beside it (that it costs more says nothing about int8)
    norm_rows = {name: rules.per_seed_pct(row) for name, row in variants.items()
                 if "norms" in name and "norms float" not in name}
    quantized = {name: deltas for name, deltas in norm_rows.items() if "norms int8" in name}
    verdict = rules.int8_norms(r["norm_bytes_saved_by_int8"], skipped["bytes"],
                               rules.per_seed_pct(skipped), quantized)
    saved_pct = 100 * r["norm_bytes_saved_by_int8"] / skipped["bytes"]
    moves = ", ".join(f"{name} {rules.fmt_pct(deltas)}" for name, deltas in quantized.items())
    lower = ", ".join(f"{name} {rules.fmt_pct(deltas)}" for name, deltas in norm_rows.items()
                      if name not in quantized)
    seeds = len(rules.per_seed_pct(skipped))
    why = (f"int8 with the norms skipped moves val loss by {change(skipped)}; "
           f"quantizing the norms too: {moves}"
           + (f" (below int8, for scale: {lower})" if lower else "")
           + (f" (mean ± sd over {seeds} seeds' models)" if seeds > 1 else "")
           + f". The norms are {r['norm_params']:,} parameters: "
           f"quantizing them saves {r['norm_bytes_saved_by_int8']:,} bytes, {saved_pct:.3f}% "
           f"of the int8 model.")
    outliers = r.get("activation_outliers")
    if outliers and "w8a8" in variants:  # LLM.int8's side: the activations, not the norms
        smooth = variants.get("w8a8 + SmoothQuant")
        why += (f" The activations the norms feed: their largest channel is at most "
                f"{max(outliers['c_attn']):.1f}× (c_attn input) and "
                f"{max(outliers['c_fc']):.1f}× (c_fc input) the median channel's, and int8 "
                f"activations per token move val loss {change(variants['w8a8'])}"
                + (f" ({change(smooth)} with SmoothQuant)" if smooth else "")
                + ".")
    models = "one trained model" if seeds == 1 else f"{seeds} trained models (seeds)"
    how = (f"Val loss and bytes of {models} in float32 and int8 variants (per-channel or "
           "per-tensor scales; norms kept in float, or quantized too with one scale per γ and "
           "per β vector, at int8 and at 4 bits).")
    brief = (f"quantizing the norms saves {saved_pct:.3f}% of the int8 bytes and moves val "
             f"loss {moves} (norms float: {change(skipped)})")
    header = ["variant", "val loss", "Δ loss", "bytes", "size vs float32"]
    return Section(how, _md_table(header, rows), verdict, rules.RULES["int8"], why, brief)


CLAIMS = (
    Claim("1. LoRA vs rsLoRA",
          "LoRA's alpha/r scale quietly shrinks the update as the rank grows, so higher "
          "ranks stop helping; rsLoRA's alpha/sqrt(r) keeps learning stable across ranks.",
          (("eval.lora_rank_sweep", "lora_rank_sweep.json"),), render_lora),
    Claim("2. Positions: learned, sinusoidal, RoPE",
          "RoPE, which rotates q and k and has no parameters, learns at least as well as "
          "GPT-2's learned positions and, unlike them, runs past the training context.",
          (("eval.positions", "positions.json"),), render_positions),
    Claim("3. Weight tying",
          "Sharing wte with the output head saves about 30% of GPT-2 small, and less than "
          "0.5% at billions of parameters.",
          (("eval.tying", "tying.json"),), render_tying),
    Claim("4. Pre-LN vs post-LN",
          "Pre-LN trains stably without warmup; post-LN can end at a better loss but is "
          "unstable (its gradients grow toward the output); DeepNorm fixes post-LN.",
          (("eval.norms", "norms.json"), ("eval.norms_regime", "norms_regime.json")),
          render_norms, checks=(("eval.norms_regime", "norms_regime_d*.json"),
                                ("eval.norms", "norms_variant_*.json"))),
    Claim("5. KV cache and TurboQuant",
          "The KV cache turns per-token recomputation into a lookup (\"around 2× overall\") "
          "at a memory cost of 2 × layers × sequence × dimension; TurboQuant shrinks that "
          "memory 5–6× at about 3 bits per value \"with zero accuracy loss\".",
          (("eval.bench_decode", "bench_decode.json"), ("eval.kv_quant", "kv_quant.json"),
           ("eval.decode_growth", "decode_growth.json")),
          render_kv, checks=(("eval.bench_serve", "bench_serve.json"),)),
    Claim("6. INT8 weights, norms skipped",
          "LayerNorm is left in full precision when the weights go to INT8, because "
          "quantizing it saves almost nothing and costs accuracy.",
          (("eval.quantization", "quantization.json"),), render_int8),
)


# ---------------------------------------------------------------------------- running


TRAINS = ("eval.lora_rank_sweep", "eval.positions", "eval.tying", "eval.norms",
          "eval.norms_regime", "eval.quantization")  # they take --seeds


def _argv(module: str, json_name: str, quick: bool, out: Path, work: Path,
          seeds: int | None = None) -> list[str]:
    """The experiment's own CLI arguments for this run."""
    argv = ["--quick"] if quick else []
    if seeds and module in TRAINS:
        argv += ["--seeds", str(seeds)]
    if module in ("eval.bench_decode", "eval.decode_growth"):
        return argv + ["--json", str(out / json_name)]
    if module == "eval.quantization":  # quick: kv_quant's toy model, no second training
        model = json.loads((out / "kv_quant.json").read_text())["checkpoint"] if quick else None
        return argv + ["--out", str(out)] + (["--ckpt", model] if quick else ["--work", str(work)])
    if module == "eval.lora_rank_sweep":
        return argv + ["--out", str(out), "--work", str(work / "lora_rank_sweep")]
    return argv + ["--out", str(out), "--work", str(work)]


def command(module: str, quick: bool) -> str:
    return f"python -m {module}{' --quick' if quick else ''}"


def run_experiments(quick: bool, out: Path, work: Path, rerun: bool,
                    seeds: int | None = None) -> dict[str, float]:
    """Run each experiment whose JSON is missing (every one with --quick or --rerun)."""
    seconds = {}
    for claim in CLAIMS:
        for module, json_name in claim.experiments:
            if not (quick or rerun) and (out / json_name).exists():
                continue
            print(f"==> {command(module, quick)}", flush=True)
            t = time.perf_counter()
            importlib.import_module(module).main(
                _argv(module, json_name, quick, out, work, seeds))
            seconds[module] = time.perf_counter() - t
    return seconds


RECORDS = {"bench_decode.json": DecodeResult, "bench_serve.json": ServeResult,
           "decode_growth.json": GrowthResult}  # typed records


def _load(path: Path) -> dict | DecodeResult:
    if path.name in RECORDS:
        return read_record(path, RECORDS[path.name])
    return json.loads(path.read_text())


def sections(out: Path) -> list[tuple[Claim, Section]]:
    """Each claim with its section, rendered from the JSON files in `out`."""
    done = []
    for claim in CLAIMS:
        results = {name: _load(out / name) for _, name in claim.outputs(out)}
        done.append((claim, claim.render(results)))
    return done


def recorded_commands(claim: Claim, out: Path, quick: bool) -> str:
    """The commands that made the claim's JSON files, as each records itself (flags and
    all), else the experiment's plain command (also where a record holds None: made before
    records kept it)."""
    return ", ".join(
        f"`{json.loads((out / name).read_text()).get('command') or command(m, quick)}`"
        for m, name in claim.outputs(out))


def report(quick: bool, out: Path) -> str:
    """REPORT.md's text from the JSON files in `out`."""
    parts = ["# The article's six claims, measured", ""]
    if quick:
        parts += ["> **Smoke test (`--quick`)**: toy models and a few steps. These numbers "
                  "show that every experiment runs end to end, not whether a claim holds; "
                  "the committed full report is eval/results/REPORT.md.", ""]
    summary = []
    body = []
    for claim, s in sections(out):
        summary.append([claim.title, s.verdict.outcome])
        plots = "\n\n".join(f"![{name[:-5]}]({name[:-5]}.png)" for _, name in claim.outputs(out))
        commands = recorded_commands(claim, out, quick)
        parts_text = "; ".join(f"{part}: {outcome}" for part, outcome in s.verdict.parts.items())
        body += [f"## {claim.title}", "", f"**Claim.** {claim.statement}", "",
                 f"**Measured.** {s.how}", "", s.table, "", plots, "",
                 f"**Verdict: {s.verdict.outcome}.** {s.why}", "",
                 f"**Rule.** {s.rule}. Parts: {parts_text}.", "",
                 f"**Reproduce:** {commands}", ""]
    parts += [_md_table(["claim", "verdict"], summary), "", rules.SEEDS_RULE, "", *body]
    return "\n".join(parts)


def readme_table(out: Path) -> str:
    """The README's claims table: verdict and key numbers per claim, from the JSON."""
    rows = [[claim.title, f"**{s.verdict.outcome}**", s.brief,
             recorded_commands(claim, out, False)]
            for claim, s in sections(out)]
    return _md_table(["claim", "verdict", "measured", "command"], rows)


def figures_table(out: Path) -> str:
    """The README's "Other figures" table, from kv_quant.json, lora_rank_sweep.json and
    train_shakespeare.json in `out`."""
    kv = json.loads((out / "kv_quant.json").read_text())
    tq, unbiased, bf16 = (kv["rows"][n] for n in ("tq3-mse", "tq3-mse-unbiased", "bfloat16"))
    sweep = json.loads((out / "lora_rank_sweep.json").read_text())
    by = {m: sorted((r["rank"], r["val_loss"]) for r in sweep["runs"] if r["method"] == m)
          for m in ("lora", "rslora")}
    ranks = [rank for rank, _ in by["lora"]]
    job = json.loads((out / "train_shakespeare.json").read_text())
    model = job["config"]["model"]
    curve = lambda m: f"{by[m][0][1]:.3f} → {by[m][-1][1]:.3f}"
    rows = [
        ["TurboQuant 3-bit cache quality",
         f"val loss {tq['delta_loss_pct']:+.2f}% ({unbiased['delta_loss_pct']:+.2f}% with the "
         f"unbiased scale), {100 * tq['greedy_match']:.0f}% of {kv['new_tokens']} greedy tokens "
         f"equal (bfloat16: {100 * bf16['greedy_match']:.1f}%), "
         f"{tq['compression_vs_fp16']:.2f}× smaller than float16",
         "float32 cache", f"`{kv['command']}`"],
        [f"LoRA vs rsLoRA, rank {ranks[0]} → {ranks[-1]}",
         f"LoRA val {curve('lora')}; rsLoRA {curve('rslora')}",
         f"base {sweep['base_val_loss']:.3f}", f"`{sweep['command']}`"],
        [f"main job: Tiny Shakespeare, {model['n_layer']}L/{model['n_embd']}d, "
         f"{model['pos_embedding']} positions",
         f"val loss {job['val_loss']:.3f} (full val split) after {job['wall_s']:.0f} s, "
         f"{job['step']} steps ({job['machine']['cpu']}, {job['machine']['cores']} cores; "
         f"`eval/results/train_shakespeare.json`)", "—", f"`{job['command']}`"],
    ]
    return _md_table(["what", "figure", "reference in the same run", "command"], rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.claims", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy versions of every experiment")
    p.add_argument("--out", type=Path, help="default eval/results (quick: eval/results/quick)")
    p.add_argument("--work", type=Path, help="training runs (default out/claims[_quick])")
    p.add_argument("--rerun", action="store_true", help="rerun experiments whose JSON exists")
    p.add_argument("--seeds", type=int, help="seeds per arm of the training comparisons "
                   "(default: each experiment's, 3; with --quick 1)")
    p.add_argument("--report-only", action="store_true",
                   help="write REPORT.md (and, for eval/results, the README's claims table) "
                   "from the JSON in --out; train nothing")
    p.add_argument("--readme", type=Path, help="README whose claims table to rewrite (default "
                   "README.md when --out is eval/results, else none)")
    args = p.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    work = args.work or Path("out") / f"claims{'_quick' if args.quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    seconds = {} if args.report_only else run_experiments(args.quick, out, work, args.rerun,
                                                          args.seeds)
    (out / "REPORT.md").write_text(report(args.quick, out))
    # the README shows the committed full results, never a smoke test's or a scratch copy's
    readme = args.readme or (README if out.resolve() == RESULTS.resolve() else None)
    if readme:
        write_readme_block("claims", readme_table(out), readme)
        write_readme_block("figures", figures_table(out), readme)
    for module, s in seconds.items():
        print(f"{module:<24} {s:6.0f} s")
    print(f"wrote {out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
