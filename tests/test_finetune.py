"""LoRA fine-tuning through the trainer: only the adapters train, the base stays bitwise the
same, checkpoints hold adapters plus a checked reference to the base, resume is exact, and
sampling a fine-tune's checkpoint uses the merged model."""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest
from trainutil import TINY_MODEL, killed_then_resumed, small_corpus, tiny_config

from gpt2jax import checkpoint as ckpt_lib
from gpt2jax import lora, quantize, sample, sources
from gpt2jax.generation import generate
from gpt2jax.model import init_params
from gpt2jax.quant import int8
from train import TrainConfig, optim, train
from train import step as step_lib
from train.__main__ import main as train_main

LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lr": 3e-2, "min_lr": 3e-3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    ckpt_lib.save_params(directory, TINY_MODEL, init_params(TINY_MODEL, jax.random.key(3)))
    return directory


@pytest.fixture(scope="module")
def finetuned(corpus, base_dir, tmp_path_factory):
    cfg = tiny_config(corpus, tmp_path_factory.mktemp("lora"), init_from=f"ckpt:{base_dir}",
                      max_steps=6, ckpt_every=3, **LORA)
    return cfg, train(cfg, progress=False)


def _leaves_equal(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs)


def test_train_step_touches_only_the_adapters():
    """The unit under the trainer: after k steps the base is bitwise unchanged and the
    optimizer state mirrors the adapter tree, with no base leaf in it."""
    base = init_params(TINY_MODEL, jax.random.key(0))
    base_copy = jax.tree.map(np.array, base)
    lora_config = lora.LoRAConfig(rank=4, alpha=8.0)
    adapters = lora.init(lora_config, TINY_MODEL, jax.random.key(1))
    opt = optim.make_optimizer(weight_decay=0.1)
    step = jax.jit(step_lib.make_train_step(TINY_MODEL, opt, lora_config))
    state = step_lib.init_state(adapters.tree, opt, seed=0)
    tokens = np.random.default_rng(0).integers(0, 50257, (1, 4, 33)).astype(np.int32)
    losses = []
    for _ in range(5):
        state, m = step(state, tokens[..., :-1], tokens[..., 1:], np.float32(1e-2), base)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert _leaves_equal(base, base_copy)
    opt_paths = {p: v for p, v in ckpt_lib.tree_signature(state["opt_state"]).items()
                 if v[0]}  # the arrays; Adam's step count is a scalar
    adapter_shapes = {shape for shape, _ in ckpt_lib.tree_signature(adapters.tree).values()}
    assert opt_paths and all(p.rsplit("/", 1)[-1] in lora.FACTOR_NAMES for p in opt_paths)
    assert {shape for shape, _ in opt_paths.values()} == adapter_shapes
    # B moved off zero: the adapters, and only they, learned
    assert np.abs(state["params"]["h"]["attn"]["c_attn"]["q_b"]).max() > 0


def test_finetune_checkpoints_adapters_and_a_reference_to_the_base(finetuned, base_dir):
    cfg, result = finetuned
    assert result.step == 6 and np.mean(result.losses[-2:]) < result.losses[0]
    adapters, reference = ckpt_lib.load_adapters(result.out)
    assert reference["source"] == f"ckpt:{base_dir.absolute()}"
    assert adapters.config == cfg.lora_config() and adapters.base == result.config.model
    # the checkpoint holds the adapters and their optimizer state, nothing of the base
    ckpt = ckpt_lib.Checkpointer(result.out / "checkpoints", read_only=True)
    items = ckpt._manager.item_metadata(6)
    saved = {**ckpt_lib.tree_signature(items["params"].tree),
             **ckpt_lib.tree_signature(items["train"].tree)}
    ckpt.close()
    assert not [p for p in saved if "kernel" in p or "embedding" in p or "scale" in p]
    # the base on disk is bitwise the one we started from
    _, base = sources.load_model(f"ckpt:{base_dir}")
    assert _leaves_equal(base, init_params(TINY_MODEL, jax.random.key(3)))
    # load() gives the merged model: the base with K + s·A·B folded in
    config, merged = sources.load_checkpoint(result.out)
    assert config == result.config.model
    assert _leaves_equal(merged, lora.merge(base, adapters))
    assert not np.array_equal(merged["h"]["0"]["attn"]["c_attn"]["kernel"],
                              base["h"]["0"]["attn"]["c_attn"]["kernel"])
    summary = (result.out / "summary.json").read_text()
    assert f'"trainable_params": {lora.count(adapters)["trainable"]}' in summary


def test_finetune_resumes_exactly(finetuned, tmp_path):
    cfg, reference = finetuned
    cfg = cfg.replace(out=str(tmp_path / "run"))

    def stop_during_3(step, _):  # step 2's metrics are read while step 3 runs
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer finishes step 3, saves, exits

    interrupted = train(cfg, on_step=stop_during_3, progress=False)
    assert interrupted.stopped == "signal" and interrupted.step == 3
    resumed = train(cfg.replace(resume=True), progress=False)
    assert resumed.losses == reference.losses and resumed.val_loss == reference.val_loss
    assert _leaves_equal(ckpt_lib.load_adapters(resumed.out)[0].tree,
                         ckpt_lib.load_adapters(reference.out)[0].tree)


def test_a_changed_base_is_refused(finetuned, tmp_path):
    cfg, reference = finetuned
    other_base = tmp_path / "other_base"
    ckpt_lib.save_params(other_base, TINY_MODEL, init_params(TINY_MODEL, jax.random.key(4)))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="--resume over another base"):
        train(cfg.replace(resume=True, init_from=f"ckpt:{other_base}"), progress=False)
    # the checkpoint's reference points at a base that has since been overwritten
    adapters, ref = ckpt_lib.load_adapters(reference.out)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="has changed since"):
        sources.load_base({**ref, "source": f"ckpt:{other_base}"}, adapters.base)


def test_sample_cli_applies_the_merged_adapters(finetuned, capsys):
    _, result = finetuned
    sample.main(["--ckpt", str(result.out), "--prompt", "ROMEO:", "--max-new-tokens", "6",
                 "--temperature", "0"])
    printed = capsys.readouterr().out
    config, merged = sources.load_checkpoint(result.out)
    from gpt2jax import tokenizer

    prompt = tokenizer.encode("ROMEO:")
    ids = generate(merged, config, [prompt], max_new_tokens=6, key=jax.random.key(0),
                   temperature=0.0)
    assert printed == "ROMEO:" + tokenizer.decode(np.asarray(ids[0]).tolist()) + "\n"


def test_cli_lora_flags_and_errors(corpus, base_dir, tmp_path, capsys):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "cli"), "--init-from",
            f"ckpt:{base_dir}", "--lora-rank", "2", "--lora-alpha", "4", "--rslora",
            "--lora-targets", "c_attn", "c_fc", "--batch-size", "4", "--block-size", "32",
            "--max-steps", "2", "--warmup-steps", "0", "--eval-batches", "1",
            "--sample-tokens", "0", "--max-minutes", "0", "--peak-flops", "1e11",
            "--no-progress"]
    assert train_main(argv) == 0
    adapters, _ = ckpt_lib.load_adapters(tmp_path / "cli")
    assert adapters.config == lora.LoRAConfig(rank=2, alpha=4.0, targets=("c_attn", "c_fc"),
                                              rslora=True)
    assert set(adapters.tree["h"]) == {"attn", "mlp"}

    assert train_main(argv[:4] + ["--lora-rank", "4", "--print-config"]) == 2  # no base
    assert "needs a base model to adapt: pass --init-from" in capsys.readouterr().err
    assert train_main(argv[:6] + ["--lora-rank", "64", "--no-progress"]) == 2
    assert "rank=64 exceeds min(d_in, d_out)=32" in capsys.readouterr().err
    assert train_main(argv[:6] + ["--lora-rank", "4", "--lora-targets", "wte"]) == 2
    assert "unknown target(s) ['wte']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lora_rank=-1 must be 0"):
        TrainConfig(lora_rank=-1)


def test_finetune_over_a_hugging_face_folder(corpus, base_dir, tmp_path):
    """hf:DIR bases are referenced and re-hashed on load like checkpoint bases."""
    from gpt2jax import hf

    config, base = sources.load_model(f"ckpt:{base_dir}")
    hf.save(config, base, tmp_path / "hf")
    cfg = tiny_config(corpus, tmp_path / "run", init_from=f"hf:{tmp_path / 'hf'}",
                      max_steps=2, ckpt_every=2, warmup_steps=0, **LORA)
    result = train(cfg, progress=False)
    _, merged = sources.load_checkpoint(result.out)
    adapters, reference = ckpt_lib.load_adapters(result.out)
    assert reference["source"] == f"hf:{(tmp_path / 'hf').absolute()}"
    assert _leaves_equal(merged, lora.merge(jax.tree.map(np.asarray, base), adapters))


# ---------------------------------------------------------------------------- int8 base


@pytest.fixture(scope="module")
def int8_finetuned(corpus, base_dir, tmp_path_factory):
    """Adapters (with dropout, so resume must replay the masks) over an int8 copy of the base."""
    int8_dir = tmp_path_factory.mktemp("int8")
    assert quantize.main(["--ckpt", str(base_dir), "--out", str(int8_dir)]) == 0
    cfg = tiny_config(corpus, tmp_path_factory.mktemp("lora_int8"), init_from=f"ckpt:{int8_dir}",
                      max_steps=6, ckpt_every=3, lora_dropout=0.1, **LORA)
    return int8_dir, cfg, train(cfg, progress=False)


def test_lora_over_an_int8_base_trains_with_the_base_int8(int8_finetuned):
    int8_dir, cfg, result = int8_finetuned
    assert np.mean(result.losses[-2:]) < result.losses[0]
    _, base = sources.load_model(f"ckpt:{int8_dir}")
    assert int8.is_quantized(base)
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["frozen_base_bytes"] == int8.nbytes(base) < int8.nbytes(int8.dequantize(base))
    adapters, _ = ckpt_lib.load_adapters(result.out)
    assert adapters.config == cfg.lora_config() and adapters.config.dropout == 0.1
    config, merged = sources.load_checkpoint(result.out)  # what `sample --ckpt` runs: int8, merged
    assert int8.is_quantized(merged)
    assert _leaves_equal(merged, lora.merge(base, adapters, requantize=True))


def test_lora_over_an_int8_base_resumes_exactly_after_sigkill(int8_finetuned, tmp_path):
    _, cfg, reference = int8_finetuned
    resumed = killed_then_resumed(cfg.replace(out=str(tmp_path / "run")), at_step=5,
                                  checkpoints=[3])
    assert resumed.losses == reference.losses and resumed.val_loss == reference.val_loss
    assert _leaves_equal(ckpt_lib.load_adapters(resumed.out)[0].tree,
                         ckpt_lib.load_adapters(reference.out)[0].tree)


# ---------------------------------------------------------------------------- --lora-from


def test_cli_continues_a_peft_adapter(finetuned, corpus, base_dir, tmp_path, capsys):
    cfg, result = finetuned
    adapters, _ = ckpt_lib.load_adapters(result.out)
    lora.save_peft(adapters, tmp_path / "peft")
    argv = ["--data", str(corpus), "--out", str(tmp_path / "run"), "--init-from",
            f"ckpt:{base_dir}", "--lora-from", str(tmp_path / "peft"), "--batch-size", "4",
            "--block-size", "32", "--max-steps", "2", "--lr", "3e-2", "--min-lr", "3e-3",
            "--eval-batches", "1", "--sample-tokens", "0", "--max-minutes", "0",
            "--peak-flops", "1e11", "--no-progress"]
    assert train_main(argv) == 0
    continued = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the same first batch (same seed) as the run that trained them, now already adapted
    records = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    first = next(r["loss"] for r in records if "loss" in r)  # step 1
    assert first < result.losses[0] - 0.01
    assert continued["config"]["lora_rank"] == cfg.lora_rank
    assert ckpt_lib.load_adapters(tmp_path / "run")[0].config == adapters.config
    assert train_main(argv + ["--lora-rank", "8"]) == 2
    assert "sets the adapters' rank, alpha, targets and dropout from its adapter_config.json: " \
           "drop --lora-rank" in capsys.readouterr().err
