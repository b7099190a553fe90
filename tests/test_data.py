"""Data preparation: exact chunked encoding, the 90/10 files, the shakespeare lookup order
(never the network), clear errors that leave nothing half-written, the batch sampler."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error

import numpy as np
import pytest
from trainutil import SHAKESPEARE

from gpt2jax import data as corpus
from gpt2jax import tokenizer
from train import data as data_lib
from train.__main__ import main as train_main
from train.prepare import main as prepare_main

SHAKESPEARE_TOKENS = 338_025  # tokenizer.encode of the whole file (tests/test_tokenizer.py)


def test_chunked_encoding_equals_whole_text_encoding(tmp_path):
    text = SHAKESPEARE.read_text()[:200_000]
    (tmp_path / "slice.txt").write_text(text)
    whole = tokenizer.encode(text)
    for read_bytes in (1, 7, 4096):  # every cut lands somewhere else
        digest = hashlib.sha256()
        pieces = list(data_lib._text_chunks(tmp_path / "slice.txt", digest, read_bytes))
        assert "".join(pieces) == text
        assert [t for p in pieces for t in tokenizer.encode(p)] == whole
        assert digest.hexdigest() == hashlib.sha256(text.encode()).hexdigest()


def test_prepare_shakespeare_from_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2JAX_DATA_DIR", str(SHAKESPEARE.parent))
    assert prepare_main(["--data", "shakespeare", "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["source_sha256"] == corpus.SHAKESPEARE_SHA256
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16"
    assert meta["train_tokens"] + meta["val_tokens"] == SHAKESPEARE_TOKENS
    assert meta["val_tokens"] == SHAKESPEARE_TOKENS // 10
    train = data_lib.load_split(tmp_path / "out", "train")
    val = data_lib.load_split(tmp_path / "out", "val")
    whole = tokenizer.encode(SHAKESPEARE.read_text())
    assert train[:100].tolist() == whole[:100] and val[-100:].tolist() == whole[-100:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "train.bin", "val.bin"]  # the staging folder is gone
    assert "304,223 train + 33,802 val" in capsys.readouterr().out


def test_folder_of_text_files_is_joined_with_endoftext(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("Hello world. " * 40)
    (folder / "b.txt").write_text("Goodbye moon. " * 40)
    (folder / "ignored.md").write_text("not text")
    meta = data_lib.prepare(folder, tmp_path / "out", block_size=8)
    ids = np.concatenate([data_lib.load_split(tmp_path / "out", s) for s in ("train", "val")])
    assert ids.tolist().count(tokenizer.EOT_ID) == 1
    assert meta["document_separator"] == tokenizer.EOT_ID and len(meta["sources"]) == 2


def test_shakespeare_lookup_order_and_download_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2JAX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    urls = []

    def offline(url, timeout):
        urls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(corpus.urllib.request, "urlopen", offline)
    with pytest.raises(data_lib.DataError, match=r"--data /path/to/tinyshakespeare.txt"):
        data_lib.resolve_sources("shakespeare")
    assert urls == [corpus.SHAKESPEARE_URL]
    assert not (tmp_path / "cache" / "gpt2jax" / "tinyshakespeare.txt").exists()

    # A reachable server: the download is checked and lands in the user cache...
    monkeypatch.setattr(corpus.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(SHAKESPEARE.read_bytes()))
    cached = tmp_path / "cache" / "gpt2jax" / "tinyshakespeare.txt"
    assert data_lib.resolve_sources("shakespeare") == [cached]
    # ...and is found there next time, before any download.
    monkeypatch.setattr(corpus.urllib.request, "urlopen", offline)
    assert data_lib.resolve_sources("shakespeare") == [cached]
    # $GPT2JAX_DATA_DIR comes first.
    monkeypatch.setenv("GPT2JAX_DATA_DIR", str(SHAKESPEARE.parent))
    assert data_lib.resolve_sources("shakespeare") == [SHAKESPEARE.parent / "tinyshakespeare.txt"]


def test_download_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(b"not shakespeare"))
    with pytest.raises(data_lib.DataError, match="sha256"):
        corpus.download("https://example.invalid/x", tmp_path / "x.txt", "0" * 64)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.parametrize("case,content,message", [
    ("missing", None, "no such file"),
    ("empty", b"", "is empty"),
    ("short", b"To be, or not to be.", "needs at least block_size \\+ 1 = 129"),
    ("latin1", "caf\u00e9 au lait ".encode("latin-1") * 50, "not valid UTF-8 \\(byte 3"),
])
def test_bad_text_fails_clearly_and_writes_nothing(tmp_path, case, content, message):
    source = tmp_path / f"{case}.txt"
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises((data_lib.DataError, FileNotFoundError), match=message):
        data_lib.prepare(source, out, block_size=128)
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_dataset_and_preset_names(tmp_path, capsys):
    assert prepare_main(["--data", "shakespear", "--out", str(tmp_path / "o")]) == 2
    assert "neither a file, a folder, nor a known dataset (shakespeare)" in capsys.readouterr().err
    assert train_main(["--preset", "shakespear", "--print-config"]) == 2
    assert "unknown train preset 'shakespear': choose one of shakespeare" in (
        capsys.readouterr().err)
    assert train_main(["--model", "gpt3", "--print-config"]) == 2
    assert "unknown preset 'gpt3'" in capsys.readouterr().err


def test_reprepare_over_stale_output_keeps_files_consistent(tmp_path):
    (tmp_path / "a.txt").write_text("Some words here. " * 200)
    data_lib.prepare(tmp_path / "a.txt", tmp_path / "out", block_size=8)
    (tmp_path / "out" / "val.bin").write_bytes(b"\0\0")  # damage after the fact
    with pytest.raises(data_lib.DataError, match="prepare .* again"):
        data_lib.load_split(tmp_path / "out", "val")


def test_batch_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = data_lib.BatchSampler(tokens, batch_size=4, block_size=16, seed=3)
    x, y = sampler.batch(7)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # targets are the next tokens
    again = data_lib.BatchSampler(tokens, batch_size=4, block_size=16, seed=3)
    np.testing.assert_array_equal(again.batch(7)[0], x)
    assert not np.array_equal(sampler.batch(8)[0], x)
    assert not np.array_equal(data_lib.BatchSampler(tokens, 4, 16, seed=4).batch(7)[0], x)
    assert sampler.batch(7, (2, 4))[0].shape == (2, 4, 16)
    assert sampler.state(7) == {"seed": 3, "step": 7}


def test_eval_batches_cover_every_window_once():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(data_lib.eval_batches(tokens, block_size=8, batch_size=5))
    weights = np.concatenate([w for _, _, w in batches])
    assert weights.sum() == (100 - 1) // 8 == 12 and len(batches) == 3
    starts = np.concatenate([x[:, 0] for x, _, w in batches])[weights > 0]
    assert starts.tolist() == list(range(0, 96, 8))


def test_eval_subset_is_spread_over_the_whole_split():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(data_lib.eval_batches(tokens, block_size=8, batch_size=4, max_batches=2))
    starts = np.concatenate([x[:, 0] for x, _, _ in batches])
    assert len(batches) == 2 and starts[0] == 0 and starts[-1] == 123 * 8  # first and last


def test_a_process_reads_only_its_own_rows_of_each_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = data_lib.BatchSampler(tokens, batch_size=4, block_size=16, seed=3)
    x, y = sampler.batch(7, (2, 4))
    mine = sampler.batch(7, (2, 4), rows=slice(2, 4))
    np.testing.assert_array_equal(mine[0], x[:, 2:4])
    np.testing.assert_array_equal(mine[1], y[:, 2:4])
    whole = data_lib.eval_batches(tokens, block_size=8, batch_size=5)
    part = data_lib.eval_batches(tokens, block_size=8, batch_size=5, rows=slice(3, 5))
    for full_batch, my_batch in zip(whole, part, strict=True):  # padded last batch included
        for a, b in zip(full_batch, my_batch, strict=True):
            np.testing.assert_array_equal(b, a[3:5])
