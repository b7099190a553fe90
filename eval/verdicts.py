"""The article's words as verdict rules: pure functions of measured numbers, with named
thresholds, each driven to every outcome it can give by tests/test_verdicts.py.

A rule splits a claim into its parts (each "holds", "does not hold", or for a stated figure
"understates"/"overstates") and combines them. Training comparisons take per-seed lists: a
difference between two arms counts only when |Δ mean| > SPREAD_FACTOR × their pooled sd, and
never when it is below the rule's floor (with one seed per arm, the floor is all there is).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

HOLDS, PART, FAILS = "holds", "holds in part", "does not hold"
UNDERSTATES, OVERSTATES = "understates", "overstates"  # the figure is off, in that direction
VERDICTS = (HOLDS, PART, FAILS, UNDERSTATES, OVERSTATES)

SPREAD_FACTOR = 2.0  # a difference counts when |Δ| > 2 pooled sd of the seeds
LOSS_FLOOR = 0.005  # nats: below this two losses count as the same, whatever the seeds say


@dataclasses.dataclass(frozen=True)
class Verdict:
    outcome: str  # one of VERDICTS
    parts: dict[str, str]  # sub-claim -> its outcome, in the claim's order

    def __post_init__(self):
        bad = [o for o in (self.outcome, *self.parts.values()) if o not in VERDICTS]
        if bad:
            raise ValueError(f"verdict outcomes {bad} are not among {VERDICTS}")


# ---------------------------------------------------------------------------- seed statistics


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample sd); the sd is nan for fewer than 2 values (no spread measured)."""
    if len(values) == 0 or any(v is None for v in values):
        raise ValueError(f"mean_sd needs values, got {list(values)} (None is a diverged seed: "
                         f"the rule must decide divergence before comparing means)")
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """The two arms' pooled sample sd; nan unless each arm has at least 2 seeds."""
    if min(len(a), len(b)) < 2:
        return math.nan
    (_, sa), (_, sb) = mean_sd(a), mean_sd(b)
    return math.sqrt(((len(a) - 1) * sa**2 + (len(b) - 1) * sb**2) / (len(a) + len(b) - 2))


@dataclasses.dataclass(frozen=True)
class Difference:
    delta: float  # mean(a) - mean(b)
    margin: float  # what |delta| must exceed to count

    @property
    def sign(self) -> int:
        """+1 (a above b), -1 (a below b) or 0 (within the margin: no difference shown)."""
        return 0 if abs(self.delta) <= self.margin else int(math.copysign(1, self.delta))


def difference(a: Sequence[float], b: Sequence[float], *, floor: float = LOSS_FLOOR,
               k: float = SPREAD_FACTOR) -> Difference:
    """mean(a) - mean(b) and the margin it must exceed: k pooled sd, at least `floor`."""
    spread = pooled_sd(a, b)
    margin = floor if math.isnan(spread) else max(floor, k * spread)
    return Difference(mean_sd(a)[0] - mean_sd(b)[0], margin)


def per_seed(row: Mapping) -> list[float | None]:
    """A run's final val loss per seed: its `val_losses` when it ran several seeds, else
    [its one val_loss] (None where a run diverged)."""
    return list(row.get("val_losses", [None if row.get("diverged") else row["val_loss"]]))


def fmt_seeds(values: Sequence[float], digits: int = 3) -> str:
    """'5.633 ± 0.004 (3 seeds)', or the one value for a single seed."""
    mean, sd = mean_sd(values)
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({len(values)} seeds)"


def losses_by_cell(grid: Sequence[Mapping]) -> dict[tuple[float, int], dict[str, float | None]]:
    """A one-seed search's rows ({placement, lr, warmup, val_loss}) as
    {(lr, warmup): {placement: val_loss}}, in the rows' order."""
    cells: dict[tuple[float, int], dict[str, float | None]] = {}
    for r in grid:
        cells.setdefault((r["lr"], r["warmup"]), {})[r["placement"]] = r["val_loss"]
    return cells


def per_seed_pct(row: Mapping) -> list[float]:
    """A quantized variant's val-loss change (% of float) per seed: its `delta_loss_pcts`, or
    [its one delta_loss_pct] in a one-model result."""
    return list(row.get("delta_loss_pcts", [row["delta_loss_pct"]]))


def fmt_pct(values: Sequence[float]) -> str:
    """'+0.0123% ± 0.0040', or the one value for a single seed."""
    mean, sd = mean_sd(values)
    return f"{mean:+.4f}%" + ("" if math.isnan(sd) else f" ± {sd:.4f}")


# ---------------------------------------------------------------------------- combining parts


def combine(parts: Mapping[str, str], *, min_for_part: int = 1) -> Verdict:
    """holds when every part holds; holds in part when at least `min_for_part` parts hold (or
    hold in part); otherwise understates/overstates when every part is off in that one
    direction, else does not hold."""
    outcomes = list(parts.values())
    if all(o == HOLDS for o in outcomes):
        outcome = HOLDS
    elif sum(o in (HOLDS, PART) for o in outcomes) >= min_for_part:
        outcome = PART
    elif set(parts.values()) in ({UNDERSTATES}, {OVERSTATES}):
        outcome = next(iter(parts.values()))
    else:
        outcome = FAILS
    return Verdict(outcome, dict(parts))


def in_band(value: float, low: float, high: float) -> str:
    """A stated figure ("about x") against its band: holds inside [low, high]; the article
    understates a value above the band and overstates one below."""
    return UNDERSTATES if value > high else OVERSTATES if value < low else HOLDS


def _holds(ok: bool) -> str:
    return HOLDS if ok else FAILS


# ---------------------------------------------------------------------------- 1. LoRA vs rsLoRA


def lora_vs_rslora(lora: Mapping[int, Sequence[float]],
                   rslora: Mapping[int, Sequence[float]]) -> Verdict:
    """Val losses per rank (per seed). Parts: rsLoRA improves from the lowest rank to the
    highest; LoRA does not; rsLoRA beats LoRA at the highest rank. LoRA stalling is no
    evidence alone (an adapter that learns nothing stalls too), so "in part" needs one rsLoRA
    part."""
    lo, hi = min(lora), max(lora)
    parts = {
        "rsLoRA improves with rank": _holds(difference(rslora[hi], rslora[lo]).sign < 0),
        "LoRA stops improving with rank": _holds(difference(lora[hi], lora[lo]).sign >= 0),
        "rsLoRA beats LoRA at the high rank": _holds(difference(rslora[hi], lora[hi]).sign < 0),
    }
    verdict = combine(parts)
    rs_parts = (parts["rsLoRA improves with rank"], parts["rsLoRA beats LoRA at the high rank"])
    if verdict.outcome == PART and HOLDS not in rs_parts:
        return Verdict(FAILS, verdict.parts)
    return verdict


# ---------------------------------------------------------------------------- 2. positions

EXTRAPOLATION_TOLERANCE = 0.1  # nats: RoPE "runs past" T if its loss there rises less


def positions(learned: Sequence[float], sinusoidal: Sequence[float], rope: Sequence[float],
              rope_penalty: Sequence[float]) -> Verdict:
    """Val losses of learned, sinusoidal and RoPE positions (per seed) and RoPE's loss past the
    training context minus its loss over the context's second half (the first positions' high
    loss left out). Parts: RoPE is better than both others by the seed rule (a tie is not
    "better"); RoPE runs past the context (learned cannot run there at all) without its loss
    rising by more than EXTRAPOLATION_TOLERANCE."""
    return combine({
        "RoPE learns better than learned and sinusoidal": _holds(
            difference(rope, learned).sign < 0 and difference(rope, sinusoidal).sign < 0),
        "RoPE runs past the context": _holds(
            mean_sd(rope_penalty)[0] < EXTRAPOLATION_TOLERANCE),
    })


# ---------------------------------------------------------------------------- 3. tying

TYING_SMALL_BAND = (25.0, 35.0)  # % of GPT-2 small: "about 30%"
TYING_LARGE_MAX = 0.5  # % at billions of parameters: "less than 0.5%"


def tying(small_share_pct: float, billions_share_pct: float) -> Verdict:
    """The token embedding's share of GPT-2 small (what tying saves) and of the billion-scale
    preset. Parts: the small share within the "about 30%" band; the large one under 0.5%."""
    return combine({
        "about 30% of GPT-2 small": in_band(small_share_pct, *TYING_SMALL_BAND),
        # a larger share at billions is a larger saving than the article says
        "< 0.5% at billions": HOLDS if billions_share_pct < TYING_LARGE_MAX else UNDERSTATES,
    })


# ---------------------------------------------------------------------------- 4. norms

# Tiny Shakespeare's val loss under the train split's add-one unigram model (nats,
# eval.common.unigram_val_loss; tests/test_eval_pieces.py recomputes it from the data): at or
# above it a run learned token frequencies at most. Add-0.1, the best add-k, gives 6.4498.
UNIGRAM_LOSS = 6.5102
NORMS_MIN_PARTS = 2  # of 4: "holds in part" needs half the claim


def trained(val_loss: float | None) -> bool:
    """A run learned something: finite and below the unigram plateau."""
    return val_loss is not None and math.isfinite(val_loss) and val_loss < UNIGRAM_LOSS


def _failed_share(grid, placement: str) -> float:
    """The share of `placement`'s grid runs (every cell, every seed) that did not train."""
    runs = [v for seeds in grid[placement].values() for v in seeds]
    return float(np.mean([not trained(v) for v in runs]))


def norms(grid: Mapping[str, Mapping[tuple[float, int], Sequence[float | None]]],
          long: Mapping[str, Sequence[float | None]],
          regime: Mapping[str, Sequence[float | None]] | None = None) -> Verdict:
    """Final val losses (None: diverged) per placement ("pre", "post", "deepnorm"): `grid`
    the short runs by (lr, warmup steps), per seed; `long` the long runs, per seed; `regime`
    (when searched) the runs per seed at the setting a search chose because every placement
    trained there ({} if none did). Parts:
    - pre-LN trains without warmup: at every lr where pre-LN trains with warmup it trains
      without (a lr too low to learn in either case says nothing about warmup);
    - post-LN is unstable: a larger share of its grid runs fails than of pre-LN's;
    - post-LN can end better: where both train (the regime when searched, else the long
      runs), post-LN's loss is lower (untrained post-LN leaves this untested, which does not
      hold);
    - DeepNorm fixes post-LN: a smaller share of its grid runs fails than of post-LN's, and
      it trains in the long runs.
    Holds in part needs NORMS_MIN_PARTS of the four."""
    def all_train(runs):
        return all(trained(v) for v in runs)

    pre = grid["pre"]
    warm_lrs = {lr for (lr, warmup), seeds in pre.items() if warmup > 0 and all_train(seeds)}
    where = long if regime is None else regime
    both_train = bool(where) and all_train(where["pre"]) and all_train(where["post"])
    return combine({
        "pre-LN trains without warmup": _holds(
            bool(warm_lrs) and all(all_train(pre[(lr, 0)]) for lr in warm_lrs)),
        "post-LN is unstable": _holds(_failed_share(grid, "post") > _failed_share(grid, "pre")),
        "post-LN can end better": _holds(both_train and difference(where["post"],
                                                                     where["pre"]).sign < 0),
        "DeepNorm fixes post-LN": _holds(
            _failed_share(grid, "deepnorm") < _failed_share(grid, "post")
            and all_train(long["deepnorm"])),
    }, min_for_part=NORMS_MIN_PARTS)


def breaks_tradeoff(grid: Mapping[str, Mapping[tuple[float, int], Sequence[float | None]]],
                    long: Mapping[str, Sequence[float | None]], variant: str) -> str:
    """Does `variant` (DeepNorm, Double Norm, ...; in `grid` and `long` beside "pre" and, where
    trained in the same run, "post", as for `norms`) break the pre/post-LN trade-off: no larger
    share of its grid runs fails than of pre-LN's (as stable), and its long runs all train and
    end no higher, by the seed rule, than the lower of pre- and post-LN among those whose long
    runs all train."""
    if "pre" not in grid or "pre" not in long:
        raise ValueError(f"{variant} is judged against pre-LN's runs of the same code: "
                         f"train 'pre' beside it (got {sorted(long)})")
    trains = [p for p in ("pre", "post") if p in long and all(trained(v) for v in long[p])]
    if not trains or not all(trained(v) for v in long[variant]):
        return FAILS
    best = min(trains, key=lambda p: mean_sd(long[p])[0])
    return _holds(_failed_share(grid, variant) <= _failed_share(grid, "pre")
                  and difference(long[variant], long[best]).sign <= 0)


# ---------------------------------------------------------------------------- 5. KV cache

CACHE_SPEEDUP_BAND = (1.5, 2.5)  # "around 2× overall"
TQ_COMPRESSION_MIN, TQ_COMPRESSION_MAX = 5.0, 6.0  # "5–6× smaller", norms counted, vs fp16
TQ_SETTING = "tq3-mse"  # "at about 3 bits per value": the 3-bit TurboQuant_mse cache
ZERO_LOSS_PCT = 0.1  # "zero accuracy loss": val loss within 0.1%...
# ...and at least as many greedy tokens equal to the float32 cache's as the bfloat16 cache
# keeps: 200 free-running tokens drift apart on any rounding (bfloat16 keeps 95.5%), so a fixed
# 99% would call a plain half-precision cache lossy too
ZERO_LOSS_REFERENCE = "bfloat16"


def lossless(row: Mapping, reference_greedy: float) -> bool:
    """Within ZERO_LOSS_PCT of float32's val loss, and greedy agreement with the float32 cache
    no lower than `reference_greedy` (the ZERO_LOSS_REFERENCE cache's)."""
    return row["delta_loss_pct"] < ZERO_LOSS_PCT and row["greedy_match"] >= reference_greedy


def turboquant(rows: Mapping[str, Mapping]) -> Verdict:
    """kv_quant's rows (per cache kind: compression_vs_fp16 from the arrays' bytes, norms
    included; delta_loss_pct; greedy_match). Parts at the 3-bit setting: 5–6× smaller;
    zero accuracy loss."""
    three = rows[TQ_SETTING]
    ratio = three["compression_vs_fp16"]
    return combine({
        "5–6× smaller at 3 bits": in_band(ratio, TQ_COMPRESSION_MIN, TQ_COMPRESSION_MAX),
        "zero accuracy loss at 3 bits": _holds(
            lossless(three, rows[ZERO_LOSS_REFERENCE]["greedy_match"])),
    })


GROWTH_SHARE = 0.5  # per-token time "grows with T" when its T-term is half of it or more


@dataclasses.dataclass(frozen=True)
class LinearGrowth:
    """Per-token time ≈ fixed_s + per_token_s · T, fitted over lengths up to `longest`."""
    fixed_s: float
    per_token_s: float
    longest: int

    @property
    def share(self) -> float:
        """The T-term's share of the per-token time at the longest length."""
        grown = self.per_token_s * self.longest
        return grown / (self.fixed_s + grown)


def linear_growth(lengths: Sequence[int], seconds: Sequence[float]) -> LinearGrowth:
    """Least-squares a + b·T through (length, per-token seconds); a and b clipped at 0 (a cost
    cannot be negative: noise on a flat line can tilt it)."""
    if len(lengths) < 2 or len(lengths) != len(seconds):
        raise ValueError(f"a line needs >= 2 (length, seconds) pairs, got {len(lengths)} lengths "
                         f"and {len(seconds)} times")
    if not all(math.isfinite(t) and t > 0 for t in seconds):
        raise ValueError(f"per-token times {list(seconds)} must be finite and > 0 (NaN: the "
                         f"timer's noise beat the difference; measure with more rounds)")
    b, a = np.polyfit(np.asarray(lengths, np.float64), np.asarray(seconds, np.float64), 1)
    return LinearGrowth(max(float(a), 0.0), max(float(b), 0.0), int(max(lengths)))


def decode_growth(cache: LinearGrowth, recompute: LinearGrowth) -> str:
    """"The cache turns O(T²) into O(T)": a flat per-token time (T-term under GROWTH_SHARE at
    the longest length: the total is linear) with the cache, and a growing one (at least
    GROWTH_SHARE: the total is quadratic) when recomputing."""
    return _holds(cache.share < GROWTH_SHARE <= recompute.share)


def kv_cache(speedups: Sequence[float], bytes_match_formula: bool,
             tq_rows: Mapping[str, Mapping],
             growth: tuple[LinearGrowth, LinearGrowth] | None = None) -> Verdict:
    """Cache-vs-recompute decode speed-ups (batch 1, every length measured), whether the
    cache's bytes equal 2·layers·T·d·bytes, kv_quant's rows, and (when measured) the
    per-token time's growth (cache, recompute) for `decode_growth`. "Around 2×" holds when
    every speed-up is in the band; the article understates speed-ups all above it (overstates
    all below); a spread across the band holds in part."""
    sides = {in_band(s, *CACHE_SPEEDUP_BAND) for s in speedups}
    speed = sides.pop() if len(sides) == 1 else PART
    parts = {"around 2× faster": speed, "memory 2·L·T·d": _holds(bytes_match_formula)}
    if growth is not None:
        parts["O(T²) → O(T)"] = decode_growth(*growth)
    return combine({**parts, **turboquant(tq_rows).parts})


# ---------------------------------------------------------------------------- 6. int8 norms

NORM_SAVING_MAX_PCT = 1.0  # "saves almost nothing": under 1% of the int8 model's bytes
NORM_COST_MIN_PCT = 0.1  # "costs accuracy": val loss up by more than 0.1% over norms in float


def int8_norms(saved_bytes: int, int8_bytes: int, skipped_delta_pct: Sequence[float],
               quantized_delta_pct: Mapping[str, Sequence[float]]) -> Verdict:
    """Bytes saved by quantizing the norms vs the int8 model's bytes; val-loss change (% of
    float), one value per seed (the same seeds' models in every variant), with norms skipped
    and for each way of quantizing them. Parts: saves almost nothing; costs accuracy (some
    norm quantization raises the loss over skipping, paired by seed, by more than
    NORM_COST_MIN_PCT points and by more than SPREAD_FACTOR sd of the per-seed rises)."""
    def costs(deltas: Sequence[float]) -> bool:
        if len(deltas) != len(skipped_delta_pct):
            raise ValueError(f"{len(deltas)} seeds quantized vs {len(skipped_delta_pct)} "
                             f"skipped: the rise is paired by seed")
        mean, sd = mean_sd([q - s for q, s in zip(deltas, skipped_delta_pct, strict=True)])
        return mean > NORM_COST_MIN_PCT and (math.isnan(sd) or mean > SPREAD_FACTOR * sd)
    return combine({
        "quantizing norms saves almost nothing": _holds(
            100 * saved_bytes / int8_bytes < NORM_SAVING_MAX_PCT),
        "quantizing norms costs accuracy": _holds(
            any(costs(d) for d in quantized_delta_pct.values())),
    })


# ---------------------------------------------------------------------------- the rules in words

RULES = {
    "lora": ("holds if rsLoRA's val loss at the highest rank is below its loss at the lowest "
             "rank and below LoRA's at the highest, and LoRA's is not below its loss at the "
             "lowest rank (differences beyond the seed margin, at least "
             f"{LOSS_FLOOR} nats); in part if some but not all hold, at least one of them an "
             "rsLoRA part"),
    "positions": (f"holds if RoPE's val loss is below both learned and sinusoidal positions' "
                  f"by the seed rule and its loss past the training context rises by less "
                  f"than {EXTRAPOLATION_TOLERANCE} nats over the context's second half; in "
                  f"part if one of the two holds"),
    "tying": (f"holds if the token embedding is {TYING_SMALL_BAND[0]:g}–{TYING_SMALL_BAND[1]:g}% "
              f"of GPT-2 small and under {TYING_LARGE_MAX}% of GPT-2 XL (1.56B); a share outside "
              f"the band is over- or understated; in part if one holds"),
    "norms": (f"four parts (a run trains if its val loss is finite and below the "
              f"{UNIGRAM_LOSS} nats, the val loss of the train split's add-one unigram "
              f"model): pre-LN without warmup trains at every lr "
              f"where it trains with warmup; post-LN fails in a larger share of the grid than "
              f"pre-LN; where both train (the setting `eval.norms_regime` found every "
              f"placement training at, else the long runs) post-LN ends lower; DeepNorm fails less "
              f"than post-LN and trains in the long runs. Holds if all four, in part if at "
              f"least {NORMS_MIN_PARTS}"),
    "kv": (f"holds if every batch-1 cache speed-up is {CACHE_SPEEDUP_BAND[0]}–"
           f"{CACHE_SPEEDUP_BAND[1]}× (all above: understates), the cache bytes equal the "
           f"formula, the per-token time fitted as a + b·T has its T-term under "
           f"{GROWTH_SHARE:g} of it at the longest length with the cache and at least that "
           f"recomputing (total O(T) against O(T²)), and {TQ_SETTING} is "
           f"{TQ_COMPRESSION_MIN:g}–{TQ_COMPRESSION_MAX:g}× smaller than float16 with norms "
           f"counted, within {ZERO_LOSS_PCT}% loss and "
           f"the {ZERO_LOSS_REFERENCE} cache's greedy agreement; in part if some parts hold"),
    "int8": (f"holds if the norms' int8 saving is under {NORM_SAVING_MAX_PCT}% of the int8 "
             f"model's bytes and quantizing them to int8 (one scale per γ and per β vector) "
             f"raises val loss over skipping them, paired by seed, by more than "
             f"{NORM_COST_MIN_PCT} points of % and by more than {SPREAD_FACTOR:g} sd of the "
             f"per-seed rises; in part if one holds"),
}
SEEDS_RULE = (f"Training comparisons: a difference counts when |Δ mean| > {SPREAD_FACTOR:g} × "
              f"the pooled sd of the seeds and > {LOSS_FLOOR} nats (with one seed per arm, "
              f"only the {LOSS_FLOOR}-nat floor applies: the seed spread is unmeasured).")
