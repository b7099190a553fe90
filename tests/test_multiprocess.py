"""Two processes of one jax.distributed job (`python -m train.launch`, 2 CPU devices each)
train as one process with 4 devices does (from scratch with FSDP, and data-parallel after a
resume), their checkpoints restore under the other process count, and a killed process stops
the job with a message naming it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO
from trainutil import cli_args, small_corpus, tiny_config

from gpt2jax import checkpoint as ckpt_lib
from gpt2jax import sources
from train.launch import launch, process_env
from train.launch import main as launch_main

# 2 x 2 devices and 1 x 4 sum the same gradients in another order (gloo across processes):
# losses agree to 1e-5 (measured 9.5e-7), params per leaf to the bounds below. The largest gap
# is the key third of c_attn's bias, whose gradient is exactly 0 in exact arithmetic (softmax
# ignores a constant added to every key): Adam scales its rounding noise (~1e-10) up to steps
# of up to lr * noise / eps ~ 1e-4 (measured 5.8e-6); every other value is within 1.1e-6.
KEY_BIAS_ATOL = 1e-4
PARAM_ATOL = 1e-5


def _assert_params_match(run, reference):
    """Every leaf within PARAM_ATOL, except the key third of each c_attn bias (KEY_BIAS_ATOL)."""
    got, want = (ckpt_lib.load(r)[1] for r in (run, reference))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        name = jax.tree_util.keystr(path)
        a, b = np.asarray(a), np.asarray(b)
        if name.endswith("['c_attn']['bias']"):
            D = a.shape[-1] // 3
            np.testing.assert_allclose(a[D:2 * D], b[D:2 * D], atol=KEY_BIAS_ATOL, rtol=0,
                                       err_msg=name)
            a, b = np.delete(a, np.s_[D:2 * D]), np.delete(b, np.s_[D:2 * D])
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=0, err_msg=name)


def _env(devices: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} " \
                           f"--xla_force_host_platform_device_count={devices}"
    return env


def _launch_cli(cfg, tmp_path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "train.launch", "--processes", "2",
               "--devices-per-process", "2", "--log-dir", str(tmp_path / "logs"), "--",
               *cli_args(cfg)]
    return subprocess.Popen(command, cwd=REPO, env=_env(), text=True, **popen)


def _run_launcher(cfg, tmp_path) -> str:
    child = _launch_cli(cfg, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    return out


def _losses(run) -> list[float]:
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["loss"] for r in records if "loss" in r]


def _rewind(run, dest, step: int):
    """A copy of `run` whose newest checkpoint is `step` (the later ones deleted)."""
    shutil.copytree(run, dest)
    for later in ckpt_lib.Checkpointer(Path(run) / "checkpoints").steps():
        if later > step:
            shutil.rmtree(dest / "checkpoints" / str(later))
    return dest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The 1-process, 4-device run: 5 steps, checkpoints at 3 and 5."""
    cfg = tiny_config(corpus, tmp_path_factory.mktemp("one") / "run", max_steps=5,
                      ckpt_every=3, mesh_data=4)
    child = subprocess.run([sys.executable, "-m", "train", *cli_args(cfg)], cwd=REPO,
                           env=_env(devices=4), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    return cfg


SPY = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from gpt2jax import checkpoint
    from train import TrainConfig, train

    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    save = checkpoint.Checkpointer.save

    def spy(self, step, state, **kw):  # what the processes hold as they write a step
        save(self, step, state, **kw)
        whole = multihost_utils.process_allgather(state, tiled=True)
        if jax.process_index() == 0:
            leaves = jax.tree_util.tree_flatten_with_path(whole)[0]
            np.savez(f"{cfg.out}/written-{step}.npz",
                     **{checkpoint.path_str(p): np.asarray(x) for p, x in leaves})

    checkpoint.Checkpointer.save = spy
    train(cfg, progress=False)
""")


RESTORE_SPY = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from gpt2jax import checkpoint
    from train import TrainConfig, train

    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    restore, got, steps = checkpoint.Checkpointer.restore, {}, []

    def spy(self, *args, **kwargs):  # copies: the trainer donates the restored state
        state, meta = restore(self, *args, **kwargs)
        got.update({checkpoint.path_str(p): np.array(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(state)[0]})
        steps.append(meta["step"])
        return state, meta

    checkpoint.Checkpointer.restore = spy
    train(cfg, progress=False)
    np.savez(f"{cfg.out}/restored.npz", **got)
    with open(f"{cfg.out}/restored-steps.json", "w") as f:
        json.dump(steps, f)
""")


def test_fsdp_checkpoint_of_two_processes_resumes_in_one(reference, tmp_path, monkeypatch):
    cfg = reference.replace(out=str(tmp_path / "run"), fsdp=True)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    code = launch([sys.executable, "-c", SPY, json.dumps(cfg.to_dict())], 2, 2, tmp_path / "logs")
    assert code == 0, (tmp_path / "logs" / "process-1.log").read_text()[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(_losses(reference.out), abs=1e-5)

    # One process, one device, from the step-3 checkpoint the two processes wrote (FSDP
    # shards of both), through the trainer's own restore: every leaf as it was written. In a
    # child process like the others: an in-process train after the suite's hundreds of
    # compiles once crashed inside XLA's compiler (docs/design.md#tests).
    run = _rewind(tmp_path / "run", tmp_path / "resumed", 3)
    resumed = cfg.replace(out=str(run), mesh_data=1, fsdp=False, resume=True)
    child = subprocess.run([sys.executable, "-c", RESTORE_SPY, json.dumps(resumed.to_dict())],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert json.loads((run / "restored-steps.json").read_text()) == [3]
    got = np.load(run / "restored.npz")
    written = np.load(tmp_path / "run" / "written-3.npz")
    assert sorted(got.files) == sorted(written.files) and len(got.files) > 10
    for name in got.files:
        array = got[name]
        assert array.dtype == written[name].dtype and np.array_equal(array, written[name]), name

    # ... and training goes on to where the uninterrupted 1-process run ended.
    assert _losses(run) == pytest.approx(_losses(reference.out), abs=1e-5)
    _assert_params_match(run, reference.out)


def test_one_process_checkpoint_resumes_in_two_and_only_process_0_reports(reference, tmp_path):
    # (the FSDP test above checks 2 processes from scratch; this one, data-parallel through
    # the launcher's CLI, the steps after a resume)
    run = _rewind(reference.out, tmp_path / "run", 3)
    out = _run_launcher(reference.replace(out=str(run), resume=True), tmp_path)
    assert out.count("step 5: val loss") == 1  # process 0's report, streamed
    assert "val loss" not in (tmp_path / "logs" / "process-1.log").read_text()
    assert ckpt_lib.Checkpointer(run / "checkpoints").steps() == [3, 5]
    assert _losses(run) == pytest.approx(_losses(reference.out), abs=1e-5)
    _assert_params_match(run, reference.out)


def test_killing_one_process_stops_the_job_and_keeps_the_newest_checkpoint(reference,
                                                                            tmp_path):
    # a LoRA fine-tune of the 1-process model: every process places the frozen base itself
    cfg = reference.replace(out=str(tmp_path / "run"), max_steps=100_000, ckpt_every=2,
                            init_from=f"ckpt:{reference.out}", lora_rank=4)
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        child = _launch_cli(cfg, tmp_path, stdout=f, stderr=subprocess.STDOUT)
        try:
            ckpt_dir = tmp_path / "run" / "checkpoints"
            deadline = time.monotonic() + 240
            while not (ckpt_dir / "4").is_dir():  # orbax renames a step folder when complete
                assert child.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            pids = dict(re.findall(r"launch: process (\d) pid (\d+)", log.read_text()))
            os.kill(int(pids["1"]), signal.SIGKILL)
            killed = time.monotonic()
            code = child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
    took = time.monotonic() - killed
    out = log.read_text()
    assert code != 0 and took < 60, out
    assert f"process 1 (pid {pids['1']}) was killed by SIGKILL" in out
    with pytest.raises(ProcessLookupError):  # process 0 did not outlive the job
        os.kill(int(pids["0"]), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damaged step to skip
        config, params = sources.load_checkpoint(tmp_path / "run")
    assert config == cfg.model and max(ckpt_lib.Checkpointer(ckpt_dir).steps()) >= 4


def test_launcher_environment_and_bad_input(capsys):
    env = process_env({"XLA_FLAGS": "--a --xla_force_host_platform_device_count=8"}, 1, 3, 2,
                      1234)
    assert env["XLA_FLAGS"] == "--a --xla_force_host_platform_device_count=2"
    assert (env["JAX_COORDINATOR_ADDRESS"], env["GPT2JAX_PROCESS_ID"],
            env["GPT2JAX_NUM_PROCESSES"]) == ("localhost:1234", "1", "3")
    assert launch_main(["--processes", "0", "--", "--max-steps", "5"]) == 2
    assert "--processes 0" in capsys.readouterr().err
