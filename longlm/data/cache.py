"""Tokenised splits cached as .npy files and opened memory-mapped, so a second run starts at once."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from longlm.data.corpus import CorpusSplit


def fingerprint(*parts: object) -> str:
    """Stable short hash of file identities (path, size, mtime) and settings."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def file_identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def cached_split(
    cache_dir: Path, key: str, build: Callable[[], CorpusSplit] | None = None,
    write_tokens: Callable[[Path], tuple[int, int]] | None = None,
) -> CorpusSplit:
    """Return the split stored under `key`, building and storing it on first use.

    Either `build()` returns the whole split (in memory), or `write_tokens(path)` writes the token array as a
    .npy file itself, chunk by chunk, and returns (num_words, num_bytes): a corpus of any size is then cached
    with memory that does not grow with it (byte corpora; one document, no doc_starts)."""
    folder = cache_dir / "splits" / key
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return CorpusSplit(
            tokens=np.load(folder / "tokens.npy", mmap_mode="r"),
            doc_starts=np.load(folder / "doc_starts.npy"),
            num_words=meta["num_words"],
            num_bytes=meta["num_bytes"],
        )
    if (build is None) == (write_tokens is None):
        raise ValueError("cached_split needs exactly one of build and write_tokens.")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"tokens.{os.getpid()}.npy"
    if write_tokens is not None:
        num_words, num_bytes = write_tokens(tmp)
        doc_starts = np.zeros(1, dtype=np.int64)
    else:
        split = build()
        np.save(tmp, split.tokens)
        num_words, num_bytes, doc_starts = split.num_words, split.num_bytes, split.doc_starts
    os.replace(tmp, folder / "tokens.npy")
    np.save(folder / "doc_starts.npy", doc_starts)
    meta_tmp = folder / f"meta.{os.getpid()}.json"
    meta_tmp.write_text(json.dumps({"num_words": num_words, "num_bytes": num_bytes}))
    os.replace(meta_tmp, meta_path)  # written last: its presence means the split is complete
    return cached_split(cache_dir, key, build, write_tokens)
