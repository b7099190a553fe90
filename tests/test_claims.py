"""Smoke test of the claims report: `python -m eval.claims --quick` runs all six experiments
on toy models and writes a well-formed REPORT.md with its tables, plots and verdicts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import DATA_DIR, REPO

from eval.claims import CLAIMS
from eval.verdicts import VERDICTS


def test_quick_report_has_six_sections_with_numbers_plots_and_verdicts(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPT2JAX_DATA_DIR": str(DATA_DIR)}
    child = subprocess.run(
        [sys.executable, "-m", "eval.claims", "--quick", "--out", str(out), "--work",
         str(work)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]

    report = (out / "REPORT.md").read_text()
    sections = re.split(r"^## ", report, flags=re.M)[1:]
    assert [s.splitlines()[0] for s in sections] == [c.title for c in CLAIMS]
    for section, claim in zip(sections, CLAIMS, strict=True):
        verdict = re.search(r"\*\*Verdict: (.+?)\.\*\*", section)
        assert verdict and verdict.group(1) in VERDICTS, section[:300]
        assert re.search(r"^\|.*\d.*\|$", section, flags=re.M), f"{claim.title}: no numbers"
        assert "**Reproduce:** `python -m eval." in section
        images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
        assert len(images) == len(claim.experiments)
        for image in images:
            assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        for _, json_name in claim.experiments:
            assert isinstance(json.loads((out / json_name).read_text()), dict)
    assert "Smoke test" in report  # a quick report says what it is
