"""enwik8 (or any raw byte file): bytes are the tokens, split 90/5/5 as in the Hutter-prize protocol.

The 100,000,000-byte enwik8 splits into exactly 90M / 5M / 5M bytes; any other file is split in the same
proportions. `enwik8.zip` and gzip files are read directly. Token id = byte + 3, exactly what
transformers' ByT5 tokenizer produces (pad=0, eos=1, unk=2), which is saved with the model.
"""
from __future__ import annotations

import gzip
import zipfile
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np

from longlm.data.cache import cached_split, file_identity, fingerprint
from longlm.data.corpus import CORPORA, CorpusSplit, TokenCorpus, check_split_name

ENWIK8_SIZE = 100_000_000
BYTE_OFFSET = 3  # ByT5: ids 0..2 are pad, eos, unk


def read_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            name = "enwik8" if "enwik8" in members else members[0]
            return archive.read(name)
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"\x1f\x8b":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def split_bounds(num_bytes: int) -> dict[str, tuple[int, int]]:
    """[start, end) of each split: 90M/5M/5M for enwik8, else the same 90/5/5 proportions."""
    if num_bytes == ENWIK8_SIZE:
        a, b = 90_000_000, 95_000_000
    else:
        a, b = num_bytes * 90 // 100, num_bytes * 95 // 100
    return {"train": (0, a), "validation": (a, b), "test": (b, num_bytes)}


def bytes_to_ids(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET


@CORPORA.register("enwik8")
class Enwik8Corpus(TokenCorpus):
    def __init__(self, path, cache_dir=None, **_: object) -> None:
        super().__init__(path, cache_dir)
        if self.path.is_dir():
            raise ValueError(f"enwik8 path '{self.path}' is a folder; expected the enwik8 file, enwik8.zip or a raw byte file.")
        if self.path.stat().st_size == 0:
            raise ValueError(f"Data file '{self.path}' is empty.")

    @cached_property
    def tokenizer(self):
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)

    def split(self, name: str) -> CorpusSplit:
        check_split_name(name)
        key = fingerprint("enwik8", file_identity(self.path), name)
        return replace(cached_split(self.cache_dir, key, lambda: self._build(name)), name=name)

    def _build(self, name: str) -> CorpusSplit:
        data = read_bytes(self.path)
        start, end = split_bounds(len(data))[name]
        part = data[start:end]
        return CorpusSplit(
            tokens=bytes_to_ids(part),
            doc_starts=np.zeros(1, dtype=np.int64),
            num_words=len(part.split()),
            num_bytes=len(part),
        )
