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


def cached_split(cache_dir: Path, key: str, build: Callable[[], CorpusSplit]) -> CorpusSplit:
    """Return the split stored under `key`, building and storing it on first use."""
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
    split = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"tokens.{os.getpid()}.npy"
    np.save(tmp, split.tokens)
    os.replace(tmp, folder / "tokens.npy")
    np.save(folder / "doc_starts.npy", split.doc_starts)
    meta_tmp = folder / f"meta.{os.getpid()}.json"
    meta_tmp.write_text(json.dumps({"num_words": split.num_words, "num_bytes": split.num_bytes}))
    os.replace(meta_tmp, meta_path)  # written last: its presence means the split is complete
    return cached_split(cache_dir, key, build)
