"""The info CLI prints the weight-tying numbers the model's own shapes give."""

from __future__ import annotations

from gpt2jax import info
from gpt2jax.config import GPTConfig
from gpt2jax.model import param_breakdown


def test_tying_table(capsys):
    info.main(["--all"])
    out = capsys.readouterr().out
    gpt2_row = next(line for line in out.splitlines() if line.startswith("gpt2 "))
    tied = param_breakdown(GPTConfig.gpt2())["total"]
    untied = param_breakdown(GPTConfig.gpt2(tie_embeddings=False))["total"]
    assert gpt2_row.split()[1:4] == [f"{tied:,}", f"{untied:,}", f"{untied - tied:,}"]


def test_breakdown_for_rope_untied(capsys):
    info.main(["--preset", "baby", "--pos", "rope", "--untied"])
    out = capsys.readouterr().out
    assert "pos=rope" in out and "tied=False" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["position_embedding"] == "0"
    assert rows["lm_head"] == rows["token_embedding"] == f"{50257 * 384:,}"
