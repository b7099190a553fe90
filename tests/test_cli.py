"""Every command line fails the same way (one line, status 2, no traceback), keeps library
logs quiet unless --verbose, and `sample --stream` prints the stream's text."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from trainutil import TINY_MODEL

from gpt2jax import checkpoint, sample, tokenizer
from gpt2jax.generation import generate_stream
from gpt2jax.model import init_params
from train.__main__ import build_parser as train_parser
from train.__main__ import main as train_main


def test_every_cli_names_a_missing_folder_in_one_line(tmp_path):
    missing = tmp_path / "missing"
    commands = {
        "train": ["-m", "train", "--data", str(missing), "--out", str(tmp_path / "out")],
        "sample": ["-m", "gpt2jax.sample", "--ckpt", str(missing), "--prompt", "hi"],
        "quantize": ["-m", "gpt2jax.quantize", "--ckpt", str(missing), "--out",
                     str(tmp_path / "q")],
        "info": ["-m", "gpt2jax.info", "--preset", "missing"],  # no folder: a bad value
        "perplexity": ["-m", "eval.perplexity", "--ckpt", str(missing), "--data", "x.txt"],
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = {name: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for name, argv in commands.items()}  # in parallel: each pays its imports
    for name, child in children.items():
        out, err = child.communicate(timeout=120)
        assert child.returncode == 2, (name, err)
        assert out == "" and "Traceback" not in err and "WARNING" not in err, (name, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "error: " in lines[0], (name, err)
        assert ("missing" in lines[0]) and ("pass " in lines[0] or "choose" in lines[0]
                                            or "invalid choice" in lines[0]), (name, err)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    checkpoint.save_params(directory, TINY_MODEL, init_params(TINY_MODEL, jax.random.key(0)))
    return directory


def test_sample_stream_prints_the_stream_and_logs_stay_quiet(ckpt_dir, capsys, caplog):
    argv = ["--ckpt", str(ckpt_dir), "--prompt", "Café 🦊", "--max-new-tokens", "9",
            "--temperature", "0.8", "--seed", "3", "--stream"]
    caplog.set_level(logging.WARNING)
    assert sample.main(argv) == 0
    printed = capsys.readouterr().out
    assert not [r for r in caplog.records if r.name == "absl"]  # orbax's "read only" notes
    assert sample.main(argv + ["--verbose"]) == 0
    assert capsys.readouterr().out == printed
    assert [r for r in caplog.records if r.name == "absl"]  # --verbose lets them through
    config, params = checkpoint.load(ckpt_dir)
    prompt = tokenizer.encode("Café 🦊")
    chunks = generate_stream(params, config, [prompt], max_new_tokens=9,
                             key=jax.random.key(3), temperature=0.8, eos_id=tokenizer.EOT_ID)
    tokens = np.concatenate(list(chunks), axis=1)[0].tolist()
    assert printed == "Café 🦊" + tokenizer.decode(t for t in tokens
                                                   if t != tokenizer.EOT_ID) + "\n"
    assert sample.main(argv + ["--num-samples", "2"]) == 2
    assert "--stream prints one sample" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):  # --verbose: the traceback, not one line
        sample.main(["--ckpt", str(ckpt_dir / "missing"), "--prompt", "x", "--verbose"])


def test_train_cli_fits_a_preset_warmup_into_a_short_run(capsys):
    assert train_main(["--max-steps", "2", "--print-config"]) == 0
    assert '"warmup_steps": 0' in capsys.readouterr().out  # the preset's 100 would not fit
    assert train_main(["--max-steps", "50", "--print-config"]) == 0
    assert '"warmup_steps": 5' in capsys.readouterr().out
    assert train_main(["--max-steps", "2", "--warmup-steps", "3", "--print-config"]) == 2
    assert "warmup_steps=3 must be in [0, max_steps=2)" in capsys.readouterr().err
    assert "shrinks to max_steps // 10" in " ".join(train_parser().format_help().split())


def test_sample_with_an_empty_prompt_starts_from_endoftext(ckpt_dir, capsys, monkeypatch):
    """As nanoGPT and Hugging Face do: the one token <|endoftext|>, never id 0 ('!')."""
    prompts = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate",
                        lambda p, c, rows, **kw: prompts.append(rows) or real_generate(p, c, rows,
                                                                                        **kw))
    assert sample.main(["--ckpt", str(ckpt_dir), "--prompt", "", "--max-new-tokens", "3"]) == 0
    assert prompts == [[[tokenizer.EOT_ID]]]
