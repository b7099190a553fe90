"""Data-parallel and FSDP training over 4 simulated CPU devices give the single-device
losses (AdamW, Muon, Double Norm); FSDP really splits the state."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from jax.sharding import PartitionSpec as P
from trainutil import run_child, small_corpus, tiny_config

from gpt2jax import sharding

CHILD = textwrap.dedent("""
    import json, sys
    import jax
    from gpt2jax import sharding
    from train import TrainConfig, train
    from train.step import init_state
    from train import optim
    from gpt2jax.model import init_params

    base = TrainConfig.from_dict(json.loads(sys.argv[1]))
    losses = {}
    for name, mesh, fsdp, optimizer, placement in (
            ("single", 1, False, "adamw", "pre"), ("data", 4, False, "adamw", "pre"),
            ("fsdp", 4, True, "adamw", "pre"), ("single-muon", 1, False, "muon", "pre"),
            ("fsdp-muon", 4, True, "muon", "pre"), ("single-double", 1, False, "adamw", "double"),
            ("fsdp-double", 4, True, "adamw", "double")):
        cfg = base.replace(out=base.out + "-" + name, mesh_data=mesh, fsdp=fsdp,
                           optimizer=optimizer,
                           model=base.model.replace(norm_placement=placement))
        losses[name] = train(cfg, progress=False).losses
    mesh = sharding.make_mesh(4)
    opt = optim.make_optimizer(weight_decay=0.1)
    state = jax.eval_shape(lambda: init_state(init_params(base.model, jax.random.PRNGKey(0)),
                                              opt, 0))
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    split = sum(x.size for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
                if s.spec != jax.sharding.PartitionSpec())
    total = sum(x.size for x in jax.tree.leaves(state))
    print("RESULT" + json.dumps({"losses": losses, "devices": jax.device_count(),
                                 "split_fraction": split / total}))
""")


def test_data_parallel_and_fsdp_match_single_device(tmp_path):
    cfg = tiny_config(small_corpus(tmp_path), tmp_path / "run", max_steps=5, ckpt_every=5,
                      eval_every=5)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    child = run_child(cfg, script=CHILD, extra_env={"XLA_FLAGS": flags})
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.split("RESULT")[-1])
    assert result["devices"] == 4
    single = result["losses"]["single"]
    assert len(single) == 5 and single[-1] < single[0]
    for name in ("data", "fsdp"):
        assert result["losses"][name] == pytest.approx(single, abs=1e-5), name
    # Muon's Newton-Schulz runs on FSDP-sharded kernels and gives the single-device losses
    muon = result["losses"]["single-muon"]
    assert muon != single and muon[-1] < muon[0]
    assert result["losses"]["fsdp-muon"] == pytest.approx(muon, abs=1e-5)
    # Double Norm's output norms are sharded like the others
    double = result["losses"]["single-double"]
    assert double != single and double[-1] < double[0]
    assert result["losses"]["fsdp-double"] == pytest.approx(double, abs=1e-5)
    assert result["split_fraction"] > 0.99  # FSDP leaves only scalars replicated


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((50257, 32), 4) == P(None, "data")  # 50257 is odd
    assert sharding.fsdp_spec((2, 32, 96), 4) == P(None, None, "data")
    assert sharding.fsdp_spec((3,), 4) == P()
    assert sharding.fsdp_spec((8, 8), 1) == P()


def test_mesh_flag_parsing_and_errors():
    assert sharding.parse_mesh("data=4") == 4
    with pytest.raises(ValueError, match="write --mesh data=N"):
        sharding.parse_mesh("model=2")
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        sharding.make_mesh(64)
