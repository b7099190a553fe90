"""Text -> GPT-2 token files, and the deterministic batch sampler that reads them.

A prepared dataset is a folder holding

    train.bin, val.bin   uint16 token ids, the first 90% / last 10% of the token stream
    meta.json            token counts, source sha256, tokenizer name

written atomically: every file is staged under a temporary name and renamed into place,
meta.json last, and the loader checks the files against meta.json.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gpt2jax import tokenizer
from gpt2jax.data import DataError, shakespeare_path

DATASETS = ("shakespeare",)
TOKENIZER = "gpt2"
VAL_FRACTION = 0.1
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; half the bytes of int32

_READ_BYTES = 1 << 22


def resolve_sources(data: str | os.PathLike) -> list[Path]:
    """The text files named by `data`: a .txt file, a folder of them, or a dataset name."""
    path = Path(data)
    if str(data) in DATASETS and not path.exists():
        return [shakespeare_path()]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no .txt files: put UTF-8 text files in it")
        return files
    if path.is_file():
        return [path]
    if path.suffix or os.sep in str(data):
        raise FileNotFoundError(
            f"--data {data}: no such file or folder; pass a UTF-8 text file, a folder of .txt "
            f"files, a prepared folder (train.bin, val.bin) or one of {', '.join(DATASETS)}")
    raise DataError(
        f"--data {data!r} is neither a file, a folder, nor a known dataset "
        f"({', '.join(DATASETS)}): pass a path to UTF-8 text or one of those names"
    )


# ---------------------------------------------------------------------------- encoding


def _last_safe_cut(text: str) -> int:
    """The last index i with text[i - 1] a non-space and text[i] a space (0 if none).

    No GPT-2 pre-token spans such a boundary (every regex alternative ends before a space
    or starts at one), so encoding the pieces cut there gives exactly the tokens of the
    whole text (tests/test_data.py checks it on Shakespeare)."""
    i = len(text) - 1
    while i > 0 and not (text[i].isspace() and not text[i - 1].isspace()):
        i -= 1
    return max(i, 0)


def _text_chunks(path: Path, digest, read_bytes: int = _READ_BYTES) -> Iterator[str]:
    """Decode `path` as strict UTF-8 block by block (hashing the bytes into `digest`),
    yielding pieces cut only at safe places."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(read_bytes)
            digest.update(raw)
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} is not valid UTF-8 (byte {offset + e.start}: {e.reason}): "
                    f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt"
                ) from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = _last_safe_cut(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]  # no safe place yet (one huge word): keep reading


def _encode_to(files: list[Path], out_file: Path) -> tuple[int, str]:
    """Encode `files` into uint16 ids appended to `out_file`; documents are separated by
    <|endoftext|>. Returns (token count, sha256 of the source bytes in order)."""
    enc = tokenizer.get_encoding()
    if enc.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"vocabulary of {enc.n_vocab} ids does not fit {TOKEN_DTYPE.__name__}")
    digest = hashlib.sha256()
    total_bytes = sum(p.stat().st_size for p in files)
    n_tokens = 0
    with open(out_file, "wb") as out, tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="encoding", leave=False
    ) as bar:
        for i, path in enumerate(files):
            if path.stat().st_size == 0:
                raise DataError(f"{path} is empty: remove it or give text to train on")
            if i:
                out.write(np.array([tokenizer.EOT_ID], TOKEN_DTYPE).tobytes())
                n_tokens += 1
            for text in _text_chunks(path, digest):
                ids = np.asarray(enc.encode_ordinary(text), TOKEN_DTYPE)
                out.write(ids.tobytes())
                n_tokens += ids.size
                bar.update(len(text.encode("utf-8")))
    return n_tokens, digest.hexdigest()


def prepare(
    data: str | os.PathLike, out: str | os.PathLike, *, block_size: int = 128,
    val_fraction: float = VAL_FRACTION,
) -> dict:
    """Encode `data` (see `resolve_sources`) into `out`/{train,val}.bin + meta.json.

    Both splits must hold at least `block_size + 1` tokens (one input window and its
    targets). Nothing appears in `out` unless everything succeeded. Returns the meta dict."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1)")
    files = resolve_sources(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".prepare-"))
    try:
        n_tokens, source_sha = _encode_to(files, staging / "all.bin")
        ids = np.memmap(staging / "all.bin", TOKEN_DTYPE, "r", shape=(n_tokens,))
        n_val = int(n_tokens * val_fraction)
        n_train = n_tokens - n_val
        if min(n_train, n_val) < block_size + 1:
            raise DataError(
                f"{data} gives {n_tokens} tokens: {n_train} train / {n_val} val, but each split "
                f"needs at least block_size + 1 = {block_size + 1}; use more text or a smaller "
                f"--block-size"
            )
        ids[:n_train].tofile(staging / "train.bin")
        ids[n_train:].tofile(staging / "val.bin")
        del ids
        meta = {
            "tokenizer": TOKENIZER,
            "vocab_size": tokenizer.N_VOCAB,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "total_tokens": n_tokens,
            "val_fraction": val_fraction,
            "source_sha256": source_sha,
            "sources": [str(p) for p in files],
            "document_separator": tokenizer.EOT_ID if len(files) > 1 else None,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        (out / "meta.json").unlink(missing_ok=True)  # a stale meta must not vouch for new bins
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------- loading


def load_split(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """The token ids of `split` ("train" or "val") as a read-only uint16 memmap [n]."""
    data_dir = Path(data_dir)
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        raise DataError(
            f"{data_dir} is not a prepared dataset (no meta.json): run "
            f"python -m train.prepare --data TEXT --out {data_dir}"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("tokenizer") != TOKENIZER:
        raise DataError(f"{data_dir} was encoded with {meta.get('tokenizer')!r}, not {TOKENIZER}")
    path = data_dir / f"{split}.bin"
    n = meta[f"{split}_tokens"]
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    if not path.is_file() or path.stat().st_size != n * itemsize:
        raise DataError(
            f"{path} does not hold the {n} tokens meta.json promises: prepare {data_dir} again"
        )
    return np.memmap(path, TOKEN_DTYPE, "r", shape=(n,))


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta.json").is_file()


# ---------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class BatchSampler:
    """Random windows of `tokens`; batch `step` depends only on (seed, step).

    So the sampler's whole state is that pair: resuming at step s replays the same batches,
    and every host of a multi-host run can draw the same global batch without talking."""

    tokens: np.ndarray  # uint16 [n]
    batch_size: int
    block_size: int
    seed: int = 0

    def __post_init__(self):
        if len(self.tokens) < self.block_size + 1:
            raise DataError(
                f"{len(self.tokens)} tokens cannot fill one window of block_size + 1 = "
                f"{self.block_size + 1}: use more text or a smaller --block-size"
            )

    def state(self, step: int) -> dict:
        return {"seed": self.seed, "step": step}

    def batch(self, step: int, shape: tuple[int, ...] | None = None, rows: slice = slice(None)):
        """(inputs, targets) int32 [*shape, block_size]; shape defaults to (batch_size,).

        `rows` picks a block of the last axis of shape (one process's share of the global
        batch): only those windows are read, the same ones a single process would read there."""
        shape = shape or (self.batch_size,)
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=shape)[..., rows]
        window = self.tokens[starts[..., None] + np.arange(self.block_size + 1)].astype(np.int32)
        return window[..., :-1], window[..., 1:]


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_batches=None,
                 rows: slice = slice(None)):
    """Non-overlapping windows of `tokens` as (inputs, targets, weights) batches
    [batch_size, block_size]. All windows by default, each once (the last batch is padded
    with weight-0 rows, so the weighted mean is the loss over every window); with
    `max_batches`, that many batches of windows spread evenly over the whole split, since
    its start alone is not representative (Shakespeare's val split: the first 64 windows
    scored 0.27 nats below all 264). `rows`: read and yield only that block of every batch."""
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise DataError(
            f"{len(tokens)} validation tokens cannot fill one window of {block_size + 1}"
        )
    windows = np.arange(n_windows)
    if max_batches and max_batches * batch_size < n_windows:
        windows = np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(int)
    for b in range(0, len(windows), batch_size):
        ids = windows[b : b + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[: len(ids)] = 1.0
        ids = np.pad(ids, (0, batch_size - len(ids)), mode="edge")[rows]
        window = tokens[ids[:, None] * block_size + np.arange(block_size + 1)].astype(np.int32)
        yield window[:, :-1], window[:, 1:], weights[rows]
