"""Each claim's verdict rule, driven by synthetic numbers to every outcome it can give, and
the seed statistics the training comparisons rest on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval import verdicts as v
from eval.verdicts import FAILS, HOLDS, OVERSTATES, PART, UNDERSTATES

# ---------------------------------------------------------------------------- statistics


def test_mean_sd_and_pooled_sd_match_numpy():
    a, b = [1.0, 2.0, 4.0], [3.0, 3.5]
    assert v.mean_sd(a) == pytest.approx((np.mean(a), np.std(a, ddof=1)))
    pooled = math.sqrt((2 * np.var(a, ddof=1) + 1 * np.var(b, ddof=1)) / 3)
    assert v.pooled_sd(a, b) == pytest.approx(pooled)
    assert math.isnan(v.mean_sd([5.0])[1]) and math.isnan(v.pooled_sd([1.0], b))
    for bad in ([], [5.0, None]):
        with pytest.raises(ValueError, match="mean_sd needs values"):
            v.mean_sd(bad)


def test_a_difference_counts_only_beyond_two_pooled_sd():
    a = [5.00, 5.02, 4.98]  # sd 0.02: the margin is 2 × 0.02 = 0.04
    assert v.difference([x + 0.05 for x in a], a).sign == 1
    assert v.difference([x - 0.05 for x in a], a).sign == -1
    assert v.difference([x + 0.03 for x in a], a).sign == 0
    assert v.difference([x + 0.03 for x in a], a).margin == pytest.approx(0.04)


def test_one_seed_per_arm_falls_back_to_the_floor():
    d = v.difference([5.0], [5.0 + 0.8 * v.LOSS_FLOOR])
    assert (d.margin, d.sign) == (v.LOSS_FLOOR, 0)
    assert v.difference([5.0], [5.0 + 2 * v.LOSS_FLOOR]).sign == -1
    identical = [5.0, 5.0, 5.0]  # no spread: the floor still applies
    assert v.difference(identical, [x + 0.5 * v.LOSS_FLOOR for x in identical]).sign == 0


def test_per_seed_and_formatting():
    assert v.per_seed({"val_loss": 5.0, "val_losses": [4.0, 6.0]}) == [4.0, 6.0]
    assert v.per_seed({"val_loss": 5.0}) == [5.0]
    assert v.per_seed({"val_loss": None, "diverged": True}) == [None]
    assert v.fmt_seeds([5.0]) == "5.000"
    assert v.fmt_seeds([4.0, 6.0]) == "5.000 ± 1.414 (2 seeds)"


def test_combine_and_bands():
    assert v.combine({"a": HOLDS, "b": HOLDS}).outcome == HOLDS
    assert v.combine({"a": HOLDS, "b": FAILS}).outcome == PART
    assert v.combine({"a": PART, "b": FAILS}).outcome == PART
    assert v.combine({"a": HOLDS, "b": FAILS}, min_for_part=2).outcome == FAILS
    assert v.combine({"a": UNDERSTATES, "b": UNDERSTATES}).outcome == UNDERSTATES
    assert v.combine({"a": OVERSTATES}).outcome == OVERSTATES
    assert v.combine({"a": OVERSTATES, "b": UNDERSTATES}).outcome == FAILS
    assert [v.in_band(x, 1.5, 2.5) for x in (1.4, 1.5, 2.5, 2.6)] == [
        OVERSTATES, HOLDS, HOLDS, UNDERSTATES]
    with pytest.raises(ValueError, match="not among"):
        v.Verdict("mostly", {})


# ---------------------------------------------------------------------------- the claims

SEEDS = np.array([0.0, 0.01, -0.01])  # three seeds, sd 0.01: margins of 0.02


def _losses(mean):
    return list(mean + SEEDS)


@pytest.mark.parametrize("rs_high, lora_high, expected", [
    (5.3, 5.5, HOLDS),  # rsLoRA improves and wins, LoRA flat
    (5.3, 5.3, PART),  # rsLoRA improves; LoRA improves as much: no win at the high rank
    (5.5, 5.5, FAILS),  # nothing moves: LoRA's stall alone is no evidence
    (5.5, 5.7, PART),  # rsLoRA flat but LoRA got worse: rsLoRA wins at the high rank only
    (5.7, 5.5, FAILS),  # rsLoRA worse
    (5.51, 5.5, FAILS),  # within the seed margin: no difference
])
def test_lora_rule(rs_high, lora_high, expected):
    lora = {4: _losses(5.5), 256: _losses(lora_high)}
    rslora = {4: _losses(5.5), 256: _losses(rs_high)}
    assert v.lora_vs_rslora(lora, rslora).outcome == expected


@pytest.mark.parametrize("rope, sinusoidal, penalty, expected", [
    (5.4, 5.9, 0.03, HOLDS),  # better than both
    (5.6, 5.9, 0.03, PART),  # within learned's seed margin: a tie is not "better"
    (5.4, 5.4, 0.03, PART),  # tied with sinusoidal
    (5.8, 5.9, 0.03, PART), (5.4, 5.9, 0.5, PART), (5.8, 5.9, 0.5, FAILS),
    (5.4, 5.9, v.EXTRAPOLATION_TOLERANCE, PART),  # the rise must stay under the tolerance
])
def test_positions_rule(rope, sinusoidal, penalty, expected):
    verdict = v.positions(_losses(5.61), _losses(sinusoidal), _losses(rope), [penalty])
    assert verdict.outcome == expected


@pytest.mark.parametrize("small, xl, expected", [
    (30.0, 0.3, HOLDS), (31.0, 5.2, PART), (20.0, 0.3, PART), (20.0, 5.2, FAILS),
    (45.0, 5.2, UNDERSTATES)])
def test_tying_rule(small, xl, expected):
    assert v.tying(small, xl).outcome == expected


def _grid(pre_no_warmup, post, deepnorm):
    """A 2-lr grid: pre-LN trains with warmup at both lrs; the others as given."""
    up = 6.6  # above the unigram plateau: did not train
    return {
        "pre": {(1e-3, 0): _losses(5.5 if pre_no_warmup else up), (1e-3, 50): _losses(5.4),
                (3e-3, 0): _losses(5.6), (3e-3, 50): _losses(5.5)},
        "post": {key: _losses(5.5) if post else [None, up, up] for key in
                 ((1e-3, 0), (1e-3, 50), (3e-3, 0), (3e-3, 50))},
        "deepnorm": {key: _losses(5.5 if deepnorm else up) for key in
                     ((1e-3, 0), (1e-3, 50), (3e-3, 0), (3e-3, 50))},
    }


@pytest.mark.parametrize("pre_ok, post_trains, deep_trains, post_long, expected", [
    (True, False, True, 6.6, PART),  # post never trains: "ends better" is untested
    (True, True, True, 5.0, PART),  # post as stable as pre: not unstable, nothing to fix
    (False, False, False, 6.6, FAILS),  # only "post is unstable" holds: 1 of 4
    (True, False, False, 6.6, PART),  # stable pre, unstable post: 2 of 4
])
def test_norms_rule(pre_ok, post_trains, deep_trains, post_long, expected):
    grid = _grid(pre_ok, post_trains, deep_trains)
    long = {"pre": _losses(5.2), "post": _losses(post_long),
            "deepnorm": _losses(5.1 if deep_trains else 6.6)}
    assert v.norms(grid, long).outcome == expected


def test_norms_rule_holds_when_every_part_does():
    grid = _grid(True, False, True)
    grid["post"][(1e-3, 50)] = _losses(5.3)  # post trains in one cell: the long runs train
    long = {"pre": _losses(5.2), "post": _losses(5.0), "deepnorm": _losses(5.1)}
    assert v.norms(grid, long) == v.Verdict(HOLDS, {
        "pre-LN trains without warmup": HOLDS, "post-LN is unstable": HOLDS,
        "post-LN can end better": HOLDS, "DeepNorm fixes post-LN": HOLDS})
    long["post"] = [5.0, None, 5.1]  # one post-LN seed diverged: not "where both train"
    assert v.norms(grid, long).parts["post-LN can end better"] == FAILS


def test_norms_rule_compares_where_the_regime_search_found_every_placement_training():
    grid = _grid(True, False, True)
    long = {"pre": _losses(5.2), "post": _losses(6.6), "deepnorm": _losses(5.1)}  # post stalls
    part = lambda regime: v.norms(grid, long, regime).parts["post-LN can end better"]
    assert part(None) == FAILS  # untested in the long runs
    assert part({"pre": [5.30, 5.31, 5.29], "post": [5.20, 5.21, 5.19]}) == HOLDS
    assert part({"pre": [5.30, 5.31, 5.29], "post": [5.40, 5.41, 5.39]}) == FAILS
    # lower by less than 2 pooled sd of the seeds: no difference
    assert part({"pre": [5.30, 5.20, 5.40], "post": [5.25, 5.15, 5.35]}) == FAILS
    assert part({}) == FAILS  # the search found no setting where every placement trains


def test_norms_rule_parts_kill_the_comparison_mutants():
    long = {"pre": _losses(5.2), "post": _losses(5.0), "deepnorm": _losses(5.1)}
    # nothing fails anywhere: equal shares are neither "unstable" nor "fixed" ('>' vs '>=',
    # '<' vs '<=' in the two shares' comparisons)
    assert v.norms(_grid(True, True, True), long).parts == {
        "pre-LN trains without warmup": HOLDS, "post-LN is unstable": FAILS,
        "post-LN can end better": HOLDS, "DeepNorm fixes post-LN": FAILS}
    # DeepNorm fails less in the grid but not in the long runs: not fixed
    stalled = {**long, "deepnorm": _losses(v.UNIGRAM_LOSS)}
    assert v.norms(_grid(True, False, True), stalled).parts == {
        "pre-LN trains without warmup": HOLDS, "post-LN is unstable": HOLDS,
        "post-LN can end better": HOLDS, "DeepNorm fixes post-LN": FAILS}


def _with_variant(grid, variant_cells_trained: int):
    """`_grid(True, False, True)` plus "double", training in the first n of its 4 cells."""
    cells = list(grid["pre"])
    up = v.UNIGRAM_LOSS + 0.1
    return {**grid, "double": {c: _losses(5.5 if i < variant_cells_trained else up)
                               for i, c in enumerate(cells)}}


@pytest.mark.parametrize("cells, long, expected", [
    (4, {"double": _losses(5.2)}, HOLDS),  # as stable as pre-LN, as low as the best
    (4, {"double": _losses(5.0)}, HOLDS),  # lower
    (3, {"double": _losses(5.0)}, FAILS),  # one cell fails that pre-LN trains in
    (4, {"double": _losses(5.4)}, FAILS),  # ends higher than pre-LN
    (4, {"double": [5.0, None, 5.0]}, FAILS),  # a long run diverged
    # post-LN trains and ends lowest: the variant must match post-LN, not pre-LN
    (4, {"post": _losses(4.8), "double": _losses(5.0)}, FAILS),
    (4, {"post": _losses(4.8), "double": _losses(4.8)}, HOLDS),
    (4, {"post": _losses(v.UNIGRAM_LOSS), "double": _losses(5.2)}, HOLDS),  # post untrained
])
def test_breaks_tradeoff_rule(cells, long, expected):
    grid = _with_variant(_grid(True, False, True), cells)
    runs = {"pre": _losses(5.2), "post": _losses(6.6), "deepnorm": _losses(5.1), **long}
    assert v.breaks_tradeoff(grid, runs, "double") == expected


def test_breaks_tradeoff_without_post_ln_compares_with_pre_ln_and_needs_it():
    grid = _with_variant(_grid(True, False, True), 4)
    grid = {p: grid[p] for p in ("pre", "double")}
    assert v.breaks_tradeoff(grid, {"pre": _losses(5.2), "double": _losses(5.2)},
                             "double") == HOLDS
    assert v.breaks_tradeoff(grid, {"pre": _losses(5.2), "double": _losses(5.4)},
                             "double") == FAILS
    with pytest.raises(ValueError, match=r"train 'pre' beside it \(got \['double'\]\)"):
        v.breaks_tradeoff({"double": grid["double"]}, {"double": _losses(5.2)}, "double")


def test_breaks_tradeoff_allows_an_equal_failure_share():
    grid = _with_variant(_grid(False, False, True), 3)  # pre-LN fails 1 of 4 cells, so does it
    runs = {"pre": _losses(5.2), "post": _losses(6.6), "double": _losses(5.2)}
    assert v.breaks_tradeoff(grid, runs, "double") == HOLDS


@pytest.mark.parametrize("loss, expected", [
    (v.UNIGRAM_LOSS - 1e-9, True), (v.UNIGRAM_LOSS, False), (None, False),
    (math.inf, False), (math.nan, False)])
def test_trained_means_finite_and_strictly_below_the_unigram_loss(loss, expected):
    assert v.trained(loss) is expected


@pytest.mark.parametrize("small, xl, parts", [
    (25.0, 0.49, (HOLDS, HOLDS)), (35.0, 0.49, (HOLDS, HOLDS)),  # the band's ends are inside
    (24.99, 0.5, (OVERSTATES, UNDERSTATES)), (35.01, 0.5, (UNDERSTATES, UNDERSTATES))])
def test_tying_rule_at_its_band_edges(small, xl, parts):
    assert tuple(v.tying(small, xl).parts.values()) == parts


@pytest.mark.parametrize("delta_pct, greedy, expected", [
    (v.ZERO_LOSS_PCT - 1e-9, 0.955, True), (v.ZERO_LOSS_PCT, 1.0, False),
    (0.0, 0.955 - 1e-9, False)])
def test_zero_loss_at_its_two_boundaries(delta_pct, greedy, expected):
    assert v.ZERO_LOSS_REFERENCE == "bfloat16"
    assert v.lossless({"delta_loss_pct": delta_pct, "greedy_match": greedy}, 0.955) is expected


def test_zero_loss_takes_the_bfloat16_cache_s_agreement_as_its_bar():
    assert v.turboquant(_tq(5.5, greedy=0.96, bf16_greedy=0.955)).outcome == HOLDS
    assert v.turboquant(_tq(5.5, greedy=0.96, bf16_greedy=0.97)).outcome == PART


def test_turboquant_rule_reads_only_its_setting_and_int8_saving_boundary():
    assert v.TQ_SETTING == "tq3-mse"
    rows = {**_tq(5.5), "tq4-mse": {"compression_vs_fp16": 4.0, "delta_loss_pct": 5.0,
                                    "greedy_match": 0.5}}
    assert v.turboquant(rows).outcome == HOLDS
    edges = {ratio: v.turboquant(_tq(ratio)).parts["5–6× smaller at 3 bits"]
             for ratio in (4.999, 5.0, 6.0, 6.001)}
    assert edges == {4.999: OVERSTATES, 5.0: HOLDS, 6.0: HOLDS, 6.001: UNDERSTATES}
    saving = lambda saved: v.int8_norms(saved, 100_000, [0.0], {"norms int8": [0.5]}).parts[
        "quantizing norms saves almost nothing"]
    assert (saving(999), saving(1_000)) == (HOLDS, FAILS)  # under 1% of the int8 bytes


def _tq(ratio, delta_pct=0.01, greedy=1.0, bf16_greedy=0.955):
    return {v.TQ_SETTING: {"compression_vs_fp16": ratio, "delta_loss_pct": delta_pct,
                           "greedy_match": greedy},
            v.ZERO_LOSS_REFERENCE: {"greedy_match": bf16_greedy}}


def test_turboquant_rule_counts_five_to_six_times_with_norms():
    assert v.turboquant(_tq(5.33)).outcome == HOLDS
    assert v.turboquant(_tq(4.92)).parts["5–6× smaller at 3 bits"] == OVERSTATES
    assert v.turboquant(_tq(4.92)).outcome == PART
    assert v.turboquant(_tq(5.5, delta_pct=0.5)).outcome == PART
    assert v.turboquant(_tq(5.5, greedy=0.9)).outcome == PART
    assert v.turboquant(_tq(4.0, delta_pct=0.5)).outcome == FAILS
    assert v.turboquant(_tq(7.1)).parts["5–6× smaller at 3 bits"] == UNDERSTATES


@pytest.mark.parametrize("speedups, exact, tq, expected, speed", [
    ([1.8, 2.2], True, _tq(5.5), HOLDS, HOLDS),
    ([5.8, 40.0], True, _tq(4.92), PART, UNDERSTATES),  # the committed measurements
    ([1.8, 4.0], False, _tq(4.0, 1.0), PART, PART),  # the band covers part of the range
    ([5.8, 40.0], False, _tq(4.0, 1.0), FAILS, UNDERSTATES),
    ([5.8, 40.0], True, _tq(6.5), PART, UNDERSTATES),
])
def test_kv_cache_rule(speedups, exact, tq, expected, speed):
    verdict = v.kv_cache(speedups, exact, tq)
    assert (verdict.outcome, verdict.parts["around 2× faster"]) == (expected, speed)


def test_linear_growth_recovers_a_line_and_clips_a_negative_tilt():
    fit = v.linear_growth([15, 64, 256, 1024], [0.02 + 1e-5 * T for T in (15, 64, 256, 1024)])
    assert (fit.fixed_s, fit.per_token_s, fit.longest) == pytest.approx((0.02, 1e-5, 1024))
    assert fit.share == pytest.approx(1e-5 * 1024 / (0.02 + 1e-5 * 1024))
    falling = v.linear_growth([15, 1024], [0.021, 0.020])  # noise on a flat line
    assert falling.per_token_s == 0.0 and falling.share == 0.0
    with pytest.raises(ValueError, match="got 1 lengths"):
        v.linear_growth([15], [0.02])
    with pytest.raises(ValueError, match=r"\[0.02, nan\] must be finite"):
        v.linear_growth([15, 32], [0.02, math.nan])


def _growth(share: float, longest: int = 1000) -> v.LinearGrowth:
    """A fit whose T-term is `share` of the per-token time at `longest`."""
    return v.LinearGrowth(1.0 - share, share / longest, longest)


@pytest.mark.parametrize("cache, recompute, expected", [
    (0.1, 0.9, HOLDS),
    (0.499, 0.5, HOLDS),  # both boundaries: flat is < GROWTH_SHARE, growing is >= it
    (0.5, 0.9, FAILS),  # the cache's per-token time grows as much as it may not
    (0.1, 0.499, FAILS),  # recomputing's does not grow enough to call the total quadratic
])
def test_decode_growth_rule_at_its_boundaries(cache, recompute, expected):
    assert v.GROWTH_SHARE == 0.5
    assert _growth(cache).share == pytest.approx(cache)
    assert v.decode_growth(_growth(cache), _growth(recompute)) == expected


def test_kv_cache_rule_takes_the_growth_part_only_where_measured():
    without = v.kv_cache([1.8, 2.2], True, _tq(5.5))
    assert "O(T²) → O(T)" not in without.parts and without.outcome == HOLDS
    flat = v.kv_cache([1.8, 2.2], True, _tq(5.5), growth=(_growth(0.1), _growth(0.9)))
    assert flat.parts["O(T²) → O(T)"] == HOLDS and flat.outcome == HOLDS
    grows = v.kv_cache([1.8, 2.2], True, _tq(5.5), growth=(_growth(0.6), _growth(0.9)))
    assert grows.parts["O(T²) → O(T)"] == FAILS and grows.outcome == PART


def test_kv_cache_rule_understates_when_every_figure_is_too_low():
    verdict = v.kv_cache([5.8, 40.0], True, _tq(7.0))
    verdict = v.combine({k: o for k, o in verdict.parts.items() if "2×" in k or "5–6" in k})
    assert verdict.outcome == UNDERSTATES


@pytest.mark.parametrize("saved, skipped, quantized, expected", [
    (100, [0.0], {"norms int8": [0.5]}, HOLDS),  # one model: only the 0.1-point floor
    (100, [0.0], {"per-channel norms int8": [0.0], "per-tensor norms int8": [0.3]}, HOLDS),
    (100, [0.0], {"norms int8": [0.05]}, PART),  # nearly free to quantize
    (5_000, [0.0], {"norms int8": [0.5]}, PART),  # a real saving
    (5_000, [0.0], {"norms int8": [0.0]}, FAILS),
    # seeds, paired: rises of 0.3, 0.31, 0.29 points are a cost...
    (100, [0.1, 0.0, 0.2], {"norms int8": [0.4, 0.31, 0.49]}, HOLDS),
    # ...rises of 0.6, -0.3, 0.3 (mean 0.2 > 0.1, but sd 0.46) are not
    (100, [0.0, 0.3, 0.0], {"norms int8": [0.6, 0.0, 0.3]}, PART),
])
def test_int8_norms_rule(saved, skipped, quantized, expected):
    assert v.int8_norms(saved, 100_000, skipped, quantized).outcome == expected


def test_int8_norms_rule_pairs_seeds_and_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="paired by seed"):
        v.int8_norms(100, 100_000, [0.0, 0.0], {"norms int8": [0.5]})


def test_every_rule_is_printed_with_its_thresholds():
    assert set(v.RULES) == {"lora", "positions", "tying", "norms", "kv", "int8"}
    assert "5–6×" in v.RULES["kv"] and "1.5–2.5×" in v.RULES["kv"]
    assert f"{v.TYING_SMALL_BAND[0]:g}–{v.TYING_SMALL_BAND[1]:g}%" in v.RULES["tying"]
    assert str(v.SPREAD_FACTOR) in v.SEEDS_RULE or f"{v.SPREAD_FACTOR:g}" in v.SEEDS_RULE
