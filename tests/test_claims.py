"""The claims report: `python -m eval.claims --quick` runs all six experiments on toy models and
writes a well-formed REPORT.md; `--report-only` rewrites REPORT.md and the README's table from
the committed JSON without training; cached runs are keyed by config and code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from eval import claims
from eval.common import RESULTS, code_hash, run_key, seeded, write_readme_block
from eval.verdicts import VERDICTS
from train import TrainConfig


def _sections(report: str) -> list[str]:
    return re.split(r"^## ", report, flags=re.M)[1:]


def _check_report(report: str, out) -> None:
    sections = _sections(report)
    assert [s.splitlines()[0] for s in sections] == [c.title for c in claims.CLAIMS]
    for section, claim in zip(sections, claims.CLAIMS, strict=True):
        verdict = re.search(r"\*\*Verdict: (.+?)\.\*\*", section)
        assert verdict and verdict.group(1) in VERDICTS, section[:300]
        rule = re.search(r"^\*\*Rule\.\*\* (.+)$", section, flags=re.M)
        assert rule and re.search(r"\d", rule.group(1)), f"{claim.title}: no thresholds"
        assert re.search(r"^\|.*\d.*\|$", section, flags=re.M), f"{claim.title}: no numbers"
        assert "**Reproduce:** `python -m eval." in section
        images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
        assert len(images) == len(claim.outputs(out))  # the experiments' and the checks'
        for image in images:
            assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


def test_quick_report_has_six_sections_with_numbers_plots_and_verdicts(tmp_path):
    # in-process: the experiments run as `python -m eval.claims --quick` runs them
    out, work = tmp_path / "results", tmp_path / "work"
    claims.main(["--quick", "--out", str(out), "--work", str(work)])
    report = (out / "REPORT.md").read_text()
    _check_report(report, out)
    for claim in claims.CLAIMS:
        for _, json_name in claim.experiments:  # every record names its host and code
            record = json.loads((out / json_name).read_text())
            assert record["code"] == code_hash() and record["machine"]["cores"] >= 1, json_name
    assert "Smoke test" in report  # a quick report says what it is


def test_report_only_rewrites_report_and_readme_from_the_json_without_training(tmp_path):
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out, ignore=shutil.ignore_patterns("quick", "REPORT.md"))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- claims:begin -->\nstale\n<!-- claims:end -->\n"
                      "<!-- figures:begin -->\nstale\n<!-- figures:end -->\nafter\n")
    claims.main(["--report-only", "--out", str(out), "--work", str(tmp_path / "work"),
                 "--readme", str(readme)])
    assert not (tmp_path / "work").exists()  # nothing trained
    report = (out / "REPORT.md").read_text()
    _check_report(report, out)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "stale" not in text
    summary = dict(re.findall(r"^\| (\d\. [^|]+) \| (?:\*\*)?([a-z ]+)(?:\*\*)? \|", report,
                              flags=re.M))
    table = dict(re.findall(r"^\| (\d\. [^|]+) \| \*\*([a-z ]+)\*\* \|", text, flags=re.M))
    assert table == summary and len(table) == len(claims.CLAIMS)


def test_committed_report_and_readme_are_what_the_json_gives(tmp_path):
    """Figures in REPORT.md and the README's claims and other-figures tables come from
    eval/results/*.json by code: regenerating them changes nothing."""
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    write_readme_block("claims", claims.readme_table(RESULTS), readme)
    write_readme_block("figures", claims.figures_table(RESULTS), readme)
    hint = "stale: run `python -m eval.claims --report-only`"
    assert readme.read_text() == (REPO / "README.md").read_text(), hint
    assert claims.report(False, RESULTS) == (RESULTS / "REPORT.md").read_text(), hint


def test_run_cache_keys_on_config_and_training_code(tmp_path):
    for folder in ("gpt2jax", "train"):
        shutil.copytree(REPO / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    cfg = TrainConfig(max_steps=10, warmup_steps=0)
    assert code_hash(tmp_path) == code_hash(REPO)  # the files' paths and bytes, nothing else
    key = run_key(cfg, tmp_path)
    assert run_key(cfg.replace(out="elsewhere"), tmp_path) == key  # the folder is no part
    assert run_key(cfg.replace(max_steps=11), tmp_path) != key
    (tmp_path / "gpt2jax" / "notes.txt").write_text("not code")
    assert run_key(cfg, tmp_path) == key
    step = tmp_path / "train" / "step.py"
    step.write_text(step.read_text() + "\n# a fix\n")
    assert run_key(cfg, tmp_path) != key


def test_a_run_stopped_by_a_signal_is_never_recorded_as_finished(tmp_path, monkeypatch):
    """SIGTERM makes the trainer save and return normally; a run cut short that way must
    not be reused as if it had trained its steps (it happened: an experiment killed by
    SIGTERM left a 78-step run recorded under a 200-step config)."""
    import types

    from eval import common

    def stopped_early(cfg, progress):
        out = Path(cfg.out)
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0, "grad_norm": 1.0}\n')
        return types.SimpleNamespace(stopped="signal", step=1, val_loss=None)

    monkeypatch.setattr(common, "train", stopped_early)
    cfg = TrainConfig(max_steps=10, warmup_steps=0)
    with pytest.raises(KeyboardInterrupt, match="stopped by a signal at step 1"):
        common.train_variant(cfg, tmp_path, "cut")
    assert not list(tmp_path.glob("cut-*/variant.json"))


def test_seeded_arm_keeps_every_seed_and_the_first_seeds_curves():
    rows = [{"val_loss": 5.0, "train_loss": [9.0, 5.0], "diverged": False},
            {"val_loss": None, "train_loss": [9.0, float("nan")], "diverged": True},
            {"val_loss": 5.2, "train_loss": [9.0, 5.2], "diverged": False}]
    arm = seeded(rows, [0, 1, 2])
    assert arm["val_losses"] == [5.0, None, 5.2] and arm["seeds"] == [0, 1, 2]
    assert arm["val_loss"] == pytest.approx(5.1) and not arm["diverged"]
    assert arm["train_loss"] == [9.0, 5.0]
    assert seeded(rows[1:2], [1])["diverged"] and seeded(rows[1:2], [1])["val_loss"] is None


def test_report_shows_seed_spread_of_multi_seed_runs(tmp_path):
    """The committed (one-seed) results given three seeds per arm: tables print mean ± sd and
    the rules take every seed."""
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out, ignore=shutil.ignore_patterns("quick", "REPORT.md"))

    def three_seeds(run):
        if run.get("val_loss") is not None:
            run["val_losses"] = [run["val_loss"] + d for d in (-0.01, 0.0, 0.01)]

    edits = {"lora_rank_sweep.json": lambda r: r["runs"],
             "positions.json": lambda r: r["runs"].values(),
             "tying.json": lambda r: r["runs"].values(),
             "norms.json": lambda r: [*r["runs"], *r["long_runs"].values()]}
    for name, runs in edits.items():
        result = json.loads((out / name).read_text())
        for run in runs(result):
            three_seeds(run)
        (out / name).write_text(json.dumps(result))
    report = claims.report(False, out)
    sections = dict(zip([c.title for c in claims.CLAIMS], _sections(report), strict=True))
    for title in [c.title for c in claims.CLAIMS[:4]]:
        assert "± 0.010 (3 seeds)" in sections[title], title
    # LoRA's rank-4 and rank-256 losses differ by 0.002 nats: below 2 pooled sd (0.02)
    assert "LoRA stops improving with rank: holds" in sections[claims.CLAIMS[0].title]


def test_int8_verdict_reads_the_int8_norm_rows_not_the_4_bit_one():
    """The article says int8 norms cost accuracy: a 4-bit row that costs 1% must not make
    that part hold when int8 norms cost nothing."""
    row = lambda delta: {"val_loss": 4.0, "delta_loss_pct": delta, "bytes": 1_000_000,
                         "size_vs_float32": 0.3}
    result = {"norm_bytes_saved_by_int8": 1_000, "norm_params": 333, "variants": {
        "float32": row(0.0), "int8 per-channel (norms float)": row(0.001),
        "int8 per-channel + norms int8": row(0.002), "int8 per-channel + norms 4-bit": row(1.0)}}
    section = claims.render_int8({"quantization.json": result})
    assert section.verdict.parts["quantizing norms costs accuracy"] == "does not hold"
    assert "for scale: int8 per-channel + norms 4-bit +1.0000%" in section.why
    result["variants"]["int8 per-channel + norms int8"] = row(0.5)
    section = claims.render_int8({"quantization.json": result})
    assert section.verdict.parts["quantizing norms costs accuracy"] == "holds"


def test_int8_section_reads_the_seeds_models_paired():
    """With seeds, the table shows mean ± sd and the cost of quantizing the norms is judged on
    each seed's rise over its own norms-float model: a mean rise of 0.2 points whose seeds
    disagree (sd 0.46) is not a cost; the same rises, consistent, are."""
    def row(deltas):
        return {"val_loss": 4.0, "val_losses": [4.0, 4.1, 3.9], "delta_loss_pct": sum(deltas) / 3,
                "delta_loss_pcts": deltas, "bytes": 1_000_000, "size_vs_float32": 0.3}
    result = {"norm_bytes_saved_by_int8": 1_000, "norm_params": 333, "variants": {
        "float32": row([0.0, 0.0, 0.0]), "int8 per-channel (norms float)": row([0.0, 0.3, 0.0]),
        "int8 per-channel + norms int8": row([0.6, 0.0, 0.3])}}
    section = claims.render_int8({"quantization.json": result})
    assert section.verdict.parts["quantizing norms costs accuracy"] == "does not hold"
    assert "4.0000 ± 0.1000 (3 seeds)" in section.table and "3 trained models" in section.how
    result["variants"]["int8 per-channel + norms int8"] = row([0.3, 0.6, 0.31])
    section = claims.render_int8({"quantization.json": result})
    assert section.verdict.parts["quantizing norms costs accuracy"] == "holds"


def test_regime_text_reads_the_per_layer_gradient_probes():
    """The spread of per-layer gradient norms, where the largest is at the end, and whether
    the probe runs are the arms' runs, all from the probes in the JSON."""
    probe = lambda norms, val: {"steps": [0, 500, 1000], "norms": norms, "val_loss": val}
    arms = {p: {"val_losses": [first, 5.5, 5.6]}
            for p, first in (("pre", 5.4), ("post", 5.5), ("deepnorm", 5.6))}
    arms["pre"]["layer_grads"] = probe([[1, 2], [1, 4], [3, 1]], 5.4)
    arms["post"]["layer_grads"] = probe([[8, 1], [2, 1], [1, 2]], 5.4)
    arms["deepnorm"]["layer_grads"] = probe([[1, 1], [1, 1], [1, 1]], 5.4)
    text = claims._layer_grads_text({"arms": arms})
    assert "pre 2.0 → 4.0 (largest) → 3.0, largest at the end in layer 0" in text
    assert "post 8.0 → 8.0 (largest) → 2.0, largest at the end in layer 1" in text
    assert "3 probes from step 0 to 1000" in text
    assert "do NOT" in text  # post's and DeepNorm's first seeds ended at 5.5 and 5.6
    for arm in arms.values():
        arm["layer_grads"]["val_loss"] = arm["val_losses"][0]
    assert "they are those runs" in claims._layer_grads_text({"arms": arms})
    assert claims._layer_grads_text({"arms": {"pre": {"val_losses": [5.0]}}}) == ""


def test_a_deeper_regime_check_is_reported_beside_the_claim_and_outside_its_verdict(tmp_path):
    """`eval.norms_regime --depth N` writes norms_regime_dN.json: when present, claim 4's
    section describes it, shows its plot and command; the verdict is the 6-layer one's."""
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out, ignore=shutil.ignore_patterns("quick", "REPORT.md"))
    claim = next(c for c in claims.CLAIMS if c.render is claims.render_norms)
    before = claims.sections(out)
    deeper = json.loads((out / "norms_regime.json").read_text())
    post = [r for r in deeper["grid"] if r["placement"] == "post"]
    for r in post:
        r["val_loss"] = 7.0  # post-LN stuck above the unigram loss at this depth
    deeper.update(depth=12, chosen=None, arms={},
                  command="python -m eval.norms_regime --cells 0.0003:100 --depth 12")
    (out / "norms_regime_d12.json").write_text(json.dumps(deeper))
    assert "norms_regime_d12.json" in [name for _, name in claim.outputs(out)]
    after = claims.sections(out)
    section = next(s for c, s in after if c is claim)
    assert "A deeper check, outside the verdict: Searching where post-LN trains (12 layers" \
        in section.why
    assert "post-LN trained at none of them" in section.why
    assert [s.verdict for _, s in after] == [s.verdict for _, s in before]
    report = claims.report(False, out)
    assert "![norms_regime_d12](norms_regime_d12.png)" in report
    assert "`python -m eval.norms_regime --cells 0.0003:100 --depth 12`" in report


def test_regime_text_gives_post_minus_pre_at_every_cell_where_both_trained():
    row = lambda placement, warmup, loss: {"placement": placement, "lr": 3e-4, "warmup": warmup,
                                           "val_loss": loss, "diverged": False}
    grid = [row("pre", 0, 5.4), row("post", 0, 5.7), row("deepnorm", 0, 5.6),
            row("pre", 500, 5.3), row("post", 500, 11.0), row("deepnorm", 500, 5.5)]
    text = claims._regime_text({"grid": grid, "depth": 6, "steps": 1000, "lrs": [3e-4],
                                "warmups": [0, 500], "chosen": None})
    assert "(post − pre, one seed each: +0.300 at lr 0.0003 warmup 0)" in text  # not at 500
    assert "post-LN trained at lr 0.0003 warmup 0;" not in text
    assert text.endswith("no setting trained every placement, so nothing is compared there.")
    one_seed = {p: {"val_losses": [5.4 + i / 10]}
                for i, p in enumerate(("pre", "post", "deepnorm"))}
    text = claims._regime_text({"grid": grid, "depth": 12, "steps": 1000, "lrs": [3e-4],
                                "warmups": [0, 500], "chosen": {"lr": 3e-4, "warmup": 0},
                                "arms": one_seed})
    assert text.endswith("post − pre +0.100 (one seed: no spread to judge it by).")


def test_a_variant_run_is_judged_beside_the_claim_and_must_share_its_settings(tmp_path):
    """`eval.norms --placements pre double` writes norms_variant_pre_double.json: claim 4's
    table gains Double Norm's rows, the text says whether it breaks the trade-off against that
    run's own pre-LN, the verdict stays the claim's."""
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out, ignore=shutil.ignore_patterns("quick", "REPORT.md",
                                                                "norms_variant_*"))
    claim = next(c for c in claims.CLAIMS if c.render is claims.render_norms)
    before = dict(claims.sections(out))[claim]
    norms = json.loads((out / "norms.json").read_text())
    # pre-LN's runs twice, one copy relabelled: as stable and as low, so it breaks the trade-off
    pre = [r for r in norms["runs"] if r["placement"] == "pre"]
    variant = {**norms, "command": "python -m eval.norms --placements pre double",
               "runs": pre + [{**r, "placement": "double"} for r in pre],
               "long_runs": {"pre": norms["long_runs"]["pre"],
                             "double": norms["long_runs"]["pre"]}}
    path = out / "norms_variant_pre_double.json"
    path.write_text(json.dumps(variant))
    shutil.copy(out / "norms.png", path.with_suffix(".png"))
    section = dict(claims.sections(out))[claim]
    assert section.verdict == before.verdict
    assert "DeepNorm does not hold (" in section.why
    assert "Double Norm holds (2 of 6 short runs failed" in section.why
    assert ("against `python -m eval.norms --placements pre double`'s own pre-LN runs (2 of 6 "
            "short runs failed" in section.why and "post-LN not rerun there" in section.why)
    assert section.table.count("| double |") == 3  # two warmups and the long runs
    path.write_text(json.dumps({**variant, "train": {**variant["train"], "max_steps": 100}}))
    with pytest.raises(ValueError, match="norms_variant_pre_double.json was trained at other"):
        claims.sections(out)
