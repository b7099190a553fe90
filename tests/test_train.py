"""The trainer: it learns, resumes bit for bit after SIGTERM and SIGKILL, survives a damaged
newest checkpoint, refuses another config's checkpoint, and stops cleanly on NaN."""

from __future__ import annotations

import json
import shlex
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from trainutil import TINY_MODEL, killed_then_resumed, run_child, small_corpus, tiny_config

from gpt2jax import checkpoint as ckpt_lib
from gpt2jax import hf, lora
from gpt2jax.model import init_params
from train import NonFiniteLossError, optim, train
from train import step as step_lib
from train.__main__ import main as train_main
from train.data import BatchSampler


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """8 steps in one go, dropout on (so the PRNG stream is part of what resume must
    replay), checkpoints at 4 and 8."""
    cfg = tiny_config(corpus, tmp_path_factory.mktemp("straight"),
                      model=TINY_MODEL.replace(dropout=0.1))
    return cfg, train(cfg, progress=False)


def _params(run_dir):
    return ckpt_lib.load(run_dir / "checkpoints")[1]


def test_loss_decreases_and_outputs_exist(straight):
    cfg, result = straight
    assert result.stopped == "max_steps" and result.step == 8 and len(result.losses) == 8
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.5
    assert result.losses[0] == pytest.approx(np.log(50257), abs=0.3)
    assert result.val_loss < result.losses[0]
    out = result.out
    assert ckpt_lib.Checkpointer(out / "checkpoints").steps() == [4, 8]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert records[-1]["val_loss"] == result.val_loss
    assert (out / "loss_curve.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["step"] == 8


def test_one_batch_overfits():
    config = TINY_MODEL.replace(block_size=16)
    opt = optim.make_optimizer(weight_decay=0.0)
    step = jax.jit(step_lib.make_train_step(config, opt), donate_argnums=0)
    state = step_lib.init_state(init_params(config, jax.random.PRNGKey(0)), opt, seed=0)
    tokens = np.random.default_rng(0).integers(0, 50257, (1, 4, 17)).astype(np.int32)
    for _ in range(60):
        state, m = step(state, tokens[..., :-1], tokens[..., 1:], 1e-2)
    assert float(m["loss"]) < 0.05


def test_gradient_accumulation_equals_the_big_batch():
    config = TINY_MODEL
    opt = optim.make_optimizer(weight_decay=0.1)
    step = jax.jit(step_lib.make_train_step(config, opt))
    state = step_lib.init_state(init_params(config, jax.random.PRNGKey(0)), opt, seed=0)
    x, y = BatchSampler(np.arange(5000, dtype=np.uint16) % 50257, 4, 32).batch(0)
    big, m_big = step(state, x[None], y[None], 1e-3)
    acc, m_acc = step(state, x.reshape(2, 2, 32), y.reshape(2, 2, 32), 1e-3)
    assert float(m_acc["loss"]) == pytest.approx(float(m_big["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(big["params"]), jax.tree.leaves(acc["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_weight_decay_only_on_kernels_and_embeddings():
    config = TINY_MODEL.replace(tie_embeddings=False)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    mask = {ckpt_lib.path_str(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
    decayed = sorted(k for k, v in mask.items() if v)
    kernels = ["attn/c_attn/kernel", "attn/c_proj/kernel", "mlp/c_fc/kernel", "mlp/c_proj/kernel"]
    assert decayed == sorted([f"h/{i}/{k}" for i in range(config.n_layer) for k in kernels]
                             + ["lm_head", "wpe/embedding", "wte/embedding"])
    assert not mask["h/0/ln_1/scale"] and not mask["h/1/attn/c_attn/bias"]


def test_muon_takes_the_blocks_kernels_and_adamw_the_rest():
    config = TINY_MODEL.replace(tie_embeddings=False)
    params = init_params(config, jax.random.PRNGKey(0))
    labels = {ckpt_lib.path_str(p): v
              for p, v in jax.tree_util.tree_flatten_with_path(optim.muon_labels(params))[0]}
    kernels = ["attn/c_attn/kernel", "attn/c_proj/kernel", "mlp/c_fc/kernel", "mlp/c_proj/kernel"]
    muon = sorted(f"h/{i}/{k}" for i in range(config.n_layer) for k in kernels)
    assert sorted(k for k, v in labels.items() if v == "muon") == muon
    assert {labels[k] for k in ("lm_head", "wte/embedding", "wpe/embedding", "ln_f/scale",
                                "h/0/ln_1/bias", "h/1/mlp/c_fc/bias")} == {"adamw"}
    # LoRA's factors stay on AdamW whatever module they adapt
    adapters = lora.init(lora.LoRAConfig(rank=2, alpha=4.0, targets=("c_attn.qv", "c_fc")), config,
                         jax.random.PRNGKey(1)).tree
    assert set(jax.tree.leaves(optim.muon_labels(adapters))) == {"adamw"}

    # each part is its reference: the kernels optax's Muon at muon_lr (its sign flipped, per
    # unit lr), everything else exactly the AdamW optimizer
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape) * 1e-2,
                         params)
    ours = optim.make_optimizer(weight_decay=0.1, grad_clip=0.0, optimizer="muon", lr=2e-3,
                                muon_lr=0.02, muon_momentum=0.9)
    adamw = optim.make_optimizer(weight_decay=0.1, grad_clip=0.0)
    muon = optax.contrib.muon(0.02, beta=0.9, weight_decay=0.1)
    d_ours = ours.update(grads, ours.init(params), params)[0]
    d_adamw = adamw.update(grads, adamw.init(params), params)[0]
    kernel = lambda tree: {k: tree["h"]["0"][k.split("/")[0]][k.split("/")[1]]["kernel"]
                           for k in ("attn/c_attn", "mlp/c_proj")}
    d_muon = muon.update(kernel(grads), muon.init(kernel(params)), kernel(params))[0]
    for k, d in kernel(d_ours).items():
        np.testing.assert_allclose(-2e-3 * d, d_muon[k], rtol=1e-5, atol=1e-9)
    for path, d in jax.tree_util.tree_flatten_with_path(d_ours)[0]:
        if labels[ckpt_lib.path_str(path)] == "adamw":
            ref = d_adamw
            for key in path:
                ref = ref[key.key]
            np.testing.assert_array_equal(d, ref)


def test_muon_accumulates_like_the_big_batch():
    opt = optim.make_optimizer(weight_decay=0.1, optimizer="muon", lr=1e-3)
    step = jax.jit(step_lib.make_train_step(TINY_MODEL, opt))
    state = step_lib.init_state(init_params(TINY_MODEL, jax.random.PRNGKey(0)), opt, seed=0)
    x, y = BatchSampler(np.arange(5000, dtype=np.uint16) % 50257, 4, 32).batch(0)
    big, _ = step(state, x[None], y[None], 1e-3)
    acc, _ = step(state, x.reshape(2, 2, 32), y.reshape(2, 2, 32), 1e-3)
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(acc), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--optimizer", "muon", "--muon-momentum", "-0.5"], "muon_momentum=-0.5 must be in [0, 1)"),
    (["--optimizer", "muon", "--muon-momentum", "1"], "muon_momentum=1.0 must be in [0, 1)"),
    (["--optimizer", "muon", "--muon-lr", "0"], "muon_lr=0.0 must be > 0"),
    (["--lr", "0"], "lr=0.0 must be > 0"),
    (["--lr=-1e-3"], "lr=-0.001 must be > 0"),
])
def test_bad_optimizer_settings_exit_2_with_one_line(flags, message, capsys):
    try:
        code = train_main([*flags, "--print-config"])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert train_main(["--optimizer", "muon", "--muon-momentum", "0", "--print-config"]) == 0


def test_exact_resume_after_sigterm_and_sigkill(straight, tmp_path):
    cfg, reference = straight
    cfg = cfg.replace(out=str(tmp_path / "run"))
    ckpt_dir = tmp_path / "run" / "checkpoints"

    # SIGTERM while step 3 runs (the host reads step 2's metrics after dispatching step 3):
    # step 3 finishes, step 3 is saved, the process exits 0.
    sigterm = f"lambda s, m: s == 2 and os.kill(os.getpid(), {int(signal.SIGTERM)})"
    child = run_child(cfg, sigterm)
    assert child.returncode == 0, child.stderr
    assert ckpt_lib.Checkpointer(ckpt_dir).steps() == [3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"] == "signal"

    # Resume, then SIGKILL at step 6, after the step-4 checkpoint: no chance to clean up.
    sigkill = f"lambda s, m: s == 6 and os.kill(os.getpid(), {int(signal.SIGKILL)})"
    child = run_child(cfg.replace(resume=True), sigkill)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert ckpt_lib.Checkpointer(ckpt_dir).steps() == [3, 4]

    resumed = train(cfg.replace(resume=True), progress=False)
    assert resumed.losses == reference.losses  # the history, replayed steps included
    assert resumed.val_loss == reference.val_loss
    for a, b in zip(jax.tree.leaves(_params(reference.out)), jax.tree.leaves(_params(resumed.out)),
                    strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_muon_resumes_bit_exact_after_sigkill(corpus, tmp_path):
    """Muon's momentum is part of the checkpoint: a run killed after its step-4 checkpoint
    resumes to the straight run's losses and params, bit for bit."""
    cfg = tiny_config(corpus, tmp_path / "straight", optimizer="muon", muon_lr=0.05,
                      model=TINY_MODEL.replace(dropout=0.1))
    reference = train(cfg, progress=False)
    assert np.mean(reference.losses[-3:]) < reference.losses[0] - 0.5
    cfg = cfg.replace(out=str(tmp_path / "run"))
    resumed = killed_then_resumed(cfg, at_step=6, checkpoints=[4])
    assert resumed.losses == reference.losses
    for a, b in zip(jax.tree.leaves(_params(reference.out)), jax.tree.leaves(_params(resumed.out)),
                    strict=True):
        assert np.array_equal(a, b)
    # Muon's settings change a Muon run, not an AdamW one
    adamw = cfg.replace(optimizer="adamw")
    assert adamw.trajectory_diff(adamw.replace(muon_lr=0.1)) == []
    assert cfg.trajectory_diff(cfg.replace(muon_lr=0.1)) == ["muon_lr: 0.05 vs 0.1"]
    # a checkpoint of one optimizer is not resumed by the other
    with pytest.raises(ValueError, match="optimizer: 'muon' vs 'adamw'"):
        train(cfg.replace(resume=True, optimizer="adamw", max_steps=10), progress=False)


def test_damaged_newest_checkpoint_falls_back_with_a_warning(straight, tmp_path):
    cfg, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference.out, run)
    for f in (run / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy cut short
    # An unfinished orbax save (the folder orbax renames only when complete) is ignored.
    (run / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()

    with pytest.warns(UserWarning, match=r"checkpoint .*/8 is unreadable .* falling back to "
                                         r"step 4"):
        config, params = ckpt_lib.load(run / "checkpoints")
    assert config == cfg.model

    with pytest.warns(UserWarning, match="falling back to step 4"):
        result = train(cfg.replace(out=str(run), resume=True), progress=False)
    assert result.step == 8 and result.losses == reference.losses
    assert (run / "checkpoints" / "corrupted").is_dir()  # moved aside, not deleted


def test_checkpoint_of_another_config_is_refused(straight, tmp_path):
    cfg, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference.out, run)
    other = cfg.replace(out=str(run), resume=True, model=cfg.model.replace(n_embd=64))
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"another model config: n_embd=32 \(checkpoint\) vs 64"):
        train(other, progress=False)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"lr: 0.01 vs 0.001"):
        train(cfg.replace(out=str(run), resume=True, lr=1e-3, min_lr=1e-4), progress=False)


def test_restore_checks_the_tree_not_just_the_config(straight):
    _, reference = straight
    ckpt = ckpt_lib.Checkpointer(reference.out / "checkpoints")
    params = jax.eval_shape(lambda: init_params(TINY_MODEL, jax.random.PRNGKey(0)))
    opt = optax.sgd(0.1)  # another optimizer: a different opt_state tree
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, opt, 0), params)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="train state does not match"):
        ckpt.restore(abstract, config=TINY_MODEL.replace(dropout=0.1))
    wrong = {**abstract, "rng": jax.ShapeDtypeStruct((2,), jnp.int32)}
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="rng: uint32"):
        ckpt_lib.check_tree(jax.eval_shape(lambda p: step_lib.init_state(p, opt, 0), params),
                            wrong, "test")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", lr=1e6, min_lr=1e5, warmup_steps=0,
                      ckpt_every=1, grad_clip=0.0)
    with pytest.raises(NonFiniteLossError, match=r"Lower --lr \(now 1000000.0\)") as info:
        train(cfg, progress=False)
    steps = ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints").steps()
    assert steps and f"last good checkpoint is step {steps[-1]}" in str(info.value)
    for leaf in jax.tree.leaves(ckpt_lib.load(tmp_path / "run" / "checkpoints")[1]):
        assert np.isfinite(leaf).all()



def test_schedule_warms_up_then_follows_steps_or_time_whichever_is_further():
    schedule = optim.LRSchedule(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert schedule(0) == 0 and schedule(5) == pytest.approx(5e-4)
    assert schedule(10) == pytest.approx(1e-3)
    assert schedule(60) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert schedule(110) == pytest.approx(1e-4)
    assert schedule(20, time_fraction=0.5) == pytest.approx(5.5e-4)  # time is further along
    assert schedule(60, time_fraction=0.1) == pytest.approx(5.5e-4)  # steps are
    with pytest.raises(ValueError, match="max_steps=10 must exceed warmup_steps=10"):
        optim.LRSchedule(1e-3, 1e-4, 10, 10)


def test_init_from_checkpoint_and_hugging_face_folder(straight, tmp_path):
    cfg, reference = straight
    config, params = ckpt_lib.load(reference.out)  # a run folder works as well
    hf.save(config, params, tmp_path / "hf")
    first = {}
    for source in (f"ckpt:{reference.out}", f"hf:{tmp_path / 'hf'}"):
        run = cfg.replace(out=str(tmp_path / source[:2]), init_from=source, max_steps=3,
                          ckpt_every=3, model=cfg.model.replace(n_layer=7))  # shape ignored
        result = train(run, progress=False)
        assert result.config.model == config
        first[source[:2]] = result.losses[0]
    assert first["ck"] == first["hf"] < reference.losses[0] - 0.5
    with pytest.raises(ValueError, match="model source .gpt3. is not understood"):
        train(cfg.replace(out=str(tmp_path / "x"), init_from="gpt3"), progress=False)


def test_cli_trains_every_switch_and_prints_a_sample(corpus, tmp_path, capsys):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "cli"), "--n-layer", "2",
            "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
            "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches",
            "1", "--ckpt-every", "2", "--sample-tokens", "8", "--max-minutes", "0",
            "--peak-flops", "1e11", "--no-progress", "--pos", "rope", "--norm", "rmsnorm",
            "--norm-placement", "post", "--untied", "--no-bias", "--dropout", "0",
            "--results", str(tmp_path / "results" / "job.json")]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "step 3: val loss" in out and "---- sample ----" in out
    # --results: the run's summary, the command that made it and the machine, and the curve
    results = json.loads((tmp_path / "results" / "job.json").read_text())
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert results == {**summary, "command": "python -m train " + shlex.join(argv)}
    assert results["step"] == 3 and results["machine"]["cores"] >= 1
    png = (tmp_path / "results" / "job.png").read_bytes()
    assert png == (tmp_path / "cli" / "loss_curve.png").read_bytes()
    # the sample starts from the data's first line, not from blank lines
    assert out.split("---- sample ----\n")[1].startswith("First Citizen:\n")
    config, params = ckpt_lib.load(tmp_path / "cli")
    assert (config.pos_embedding, config.norm, config.norm_placement) == ("rope", "rmsnorm",
                                                                          "post")
    assert not config.tie_embeddings and not config.bias and "lm_head" in params
    assert ckpt_lib.Checkpointer(tmp_path / "cli" / "checkpoints").steps() == [2, 3]


def test_the_host_reads_a_step_after_dispatching_the_next_and_agrees_every_k(
        corpus, tmp_path, monkeypatch):
    """Step n's metrics are read once step n+1 is dispatched (no wait on the device per
    step); a save (every 4 steps here) reads the step it holds first. Processes agree on stop
    signals at the first step and every `agree_every` steps, not at every step."""
    from train import trainer as trainer_lib

    events, steps_at_agree, real_agree = [], [], trainer_lib._agree
    trainer = trainer_lib.Trainer(tiny_config(corpus, tmp_path / "run", max_steps=10),
                                  progress=False)
    real_step, real_save = trainer.train_step, trainer.save
    trainer.train_step = lambda *a: events.append("dispatch") or real_step(*a)
    monkeypatch.setattr(trainer, "save", lambda: events.append("save") or real_save())
    trainer.agree_every = 4  # as in a multi-process run (AGREE_EVERY there)
    monkeypatch.setattr(trainer_lib, "_agree", lambda *a: steps_at_agree.append(
        trainer.step_count) or real_agree(*a))
    result = trainer.run(on_step=lambda step, _: events.append(f"read {step}"))
    assert events[:9] == ["dispatch", "dispatch", "read 1", "dispatch", "read 2", "dispatch",
                          "read 3", "save", "read 4"]  # step 4 is read before it is saved
    assert events[9:12] == ["dispatch", "dispatch", "read 5"]
    assert [e for e in events if e.startswith("read")] == [f"read {s}" for s in range(1, 11)]
    assert steps_at_agree == [0, 4, 8] and result.losses == trainer.losses
