"""Under CI (GPT2JAX_REQUIRE_REFERENCES=1) a missing reference library fails the parity tests
instead of skipping them; elsewhere they skip."""

from __future__ import annotations

import pytest
from conftest import REPO, require

MISSING = "gpt2jax_no_such_reference_library"


def test_a_missing_reference_skips_by_default(monkeypatch):
    monkeypatch.delenv("GPT2JAX_REQUIRE_REFERENCES", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(MISSING)


def test_a_missing_reference_fails_under_ci(monkeypatch):
    monkeypatch.setenv("GPT2JAX_REQUIRE_REFERENCES", "1")
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} is required"):
        require(MISSING)
    assert require("json").dumps([1]) == "[1]"  # a present one is imported


def test_ci_requires_the_references():
    assert "export GPT2JAX_REQUIRE_REFERENCES=1" in (REPO / ".ci" / "run").read_text()
