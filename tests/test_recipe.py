"""The recipe search: every arm is the preset with its changes, the winner follows the seed
rule at its boundary, and the quick search runs end to end into a record that reads back."""

from __future__ import annotations

import pytest

from eval import common, recipe
from train import config as train_config


def _result(arms: dict[str, tuple]) -> recipe.RecipeResult:
    return recipe.RecipeResult(
        machine=common.Machine("cpu", 2), code="abc", command="python -m eval.recipe",
        minutes=5.0, arms=tuple(recipe.ArmResult(name, {},
                                                 tuple(range(len(v))), v, (100,) * len(v))
                                for name, v in arms.items()))


def test_each_arm_is_the_preset_with_only_its_changes():
    base = train_config.preset("shakespeare")
    cfg = recipe.arm_config(base, recipe.ARMS["muon + dropout 0.1"])
    assert cfg.optimizer == "muon" and cfg.model.dropout == 0.1
    assert cfg.replace(optimizer=base.optimizer,
                       model=cfg.model.replace(dropout=base.model.dropout)) == base
    assert recipe.arm_config(base, recipe.ARMS[recipe.TODAY]) == base


def test_the_winner_must_beat_today_by_the_seed_rule():
    today = (4.60, 4.62, 4.64)  # sd 0.02: the margin is 2 pooled sd = 0.04 at equal spreads
    just_inside = tuple(v - 0.04 for v in today)  # |Δ| == margin: no difference shown
    just_past = tuple(v - 0.0401 for v in today)
    far = tuple(v - 0.2 for v in today)
    assert recipe.winner(_result({recipe.TODAY: today, "muon": just_inside})) == recipe.TODAY
    assert recipe.winner(_result({recipe.TODAY: today, "muon": just_past})) == "muon"
    # among arms ahead, the lowest mean; a diverged arm is never compared
    result = _result({recipe.TODAY: today, "muon": just_past, "muon lr 0.05": far,
                      "muon + dropout 0.1": (None, 3.0, 3.0)})
    assert recipe.winner(result) == "muon lr 0.05"
    assert set(recipe.ahead_of_today(result)) == {"muon", "muon lr 0.05"}
    # a lower mean with a wide spread is not ahead
    wide = (4.30, 4.62, 4.90)
    assert recipe.winner(_result({recipe.TODAY: today, "muon": wide})) == recipe.TODAY


def test_quick_search_runs_every_arm_and_reads_back(tmp_path, capsys):
    recipe.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    result = common.read_record(tmp_path / "recipe.json", recipe.RecipeResult)
    assert [a.name for a in result.arms] == list(recipe.ARMS)
    assert all(len(a.val_losses) == 1 and a.val_losses[0] > 0 and a.steps == (6,)
               for a in result.arms)
    # the arms really differ: Muon and dropout change the losses
    assert len({a.val_losses for a in result.arms}) == len(result.arms)
    assert (tmp_path / "recipe.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert recipe.winner(result) in out and "| adamw (today)" in out
    # --readme trains nothing: the same table again from the JSON
    recipe.main(["--readme", "--quick", "--work", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert capsys.readouterr().out.endswith(recipe.table(result) + "\n")
    assert not (tmp_path / "none").exists()


def test_a_budget_that_is_not_positive_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        recipe.main(["--minutes", "0"])
    assert e.value.code == 2 and "a run needs a budget > 0 minutes" in capsys.readouterr().err
