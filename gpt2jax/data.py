"""Corpora the library knows by name: where they are looked up, downloaded and checked.

Tiny Shakespeare is found in $GPT2JAX_DATA_DIR, then in the user cache, then downloaded
(sha256-checked, written through a temporary file so a cut download leaves nothing behind).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from gpt2jax._files import sha256_file

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"

class DataError(ValueError):
    """Input text that cannot become a training set; the message says what to change."""


def cache_dir() -> Path:
    """Per-user cache for downloaded corpora: $XDG_CACHE_HOME/gpt2jax (~/.cache/gpt2jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2jax"


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` (via a temporary file), refusing content whose sha256 differs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f)
        actual = sha256_file(Path(tmp))
        if actual != sha256:
            raise DataError(f"download of {url} has sha256 {actual}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def shakespeare_path() -> Path:
    """Tiny Shakespeare: $GPT2JAX_DATA_DIR, then the user cache, then the char-rnn download."""
    candidates = [cache_dir() / SHAKESPEARE_FILE]
    if os.environ.get("GPT2JAX_DATA_DIR"):
        candidates.insert(0, Path(os.environ["GPT2JAX_DATA_DIR"]) / SHAKESPEARE_FILE)
    for path in candidates:
        if path.is_file():
            actual = sha256_file(path)
            if actual != SHAKESPEARE_SHA256:
                raise DataError(
                    f"{path} has sha256 {actual}, not Tiny Shakespeare's {SHAKESPEARE_SHA256}: "
                    f"replace it, or pass it explicitly with --data {path}"
                )
            return path
    try:
        return download(SHAKESPEARE_URL, cache_dir() / SHAKESPEARE_FILE, SHAKESPEARE_SHA256)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"Tiny Shakespeare is not in {' or '.join(map(str, candidates))} and downloading "
            f"{SHAKESPEARE_URL} failed ({e}). Offline, pass the text file itself: "
            f"--data /path/to/{SHAKESPEARE_FILE} (or set GPT2JAX_DATA_DIR to its folder)"
        ) from e
