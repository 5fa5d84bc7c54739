"""enwik8 (or any raw byte file): bytes are the tokens, split 90/5/5 as in the Hutter-prize protocol.

The 100,000,000-byte enwik8 splits into exactly 90M / 5M / 5M bytes; any other file is split in the same
proportions. `enwik8.zip` and gzip files are read directly. Token id = byte + 3, exactly what
transformers' ByT5 tokenizer produces (pad=0, eos=1, unk=2), which is saved with the model.
"""
from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np

from longlm.data.cache import cached_split, file_identity, fingerprint
from longlm.data.corpus import CORPORA, CorpusSplit, TokenCorpus, check_split_name

ENWIK8_SIZE = 100_000_000
BYTE_OFFSET = 3  # ByT5: ids 0..2 are pad, eos, unk


CHUNK_BYTES = 1 << 24  # 16 MiB: what a streaming pass holds at once
WHITESPACE = np.zeros(256, dtype=bool)
WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.split() splits on


def open_stream(path: Path):
    """A binary file object over the decompressed bytes (zip member `enwik8` or the first, gzip, or raw)."""
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        members = [m for m in archive.namelist() if not m.endswith("/")]
        return archive.open("enwik8" if "enwik8" in members else members[0])
    with open(path, "rb") as handle:
        head = handle.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def stream_length(path: Path) -> int:
    """Decompressed size, read in chunks (a raw file's size without reading it)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                return path.stat().st_size
    total = 0
    with open_stream(path) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            total += len(chunk)
    return total


def write_byte_tokens(path: Path, start: int, end: int, target: Path) -> tuple[int, int]:
    """Bytes [start, end) of the decompressed stream as ByT5 ids into the .npy file `target`, chunk by chunk;
    returns (whitespace-separated words, bytes). Memory stays at one chunk whatever the file size: the ids go
    out through write() (a memory-mapped output would keep every written page in this process's memory)."""
    words, previous_space, offset = 0, True, 0
    with open(target, "wb") as tokens, open_stream(path) as stream:
        np.lib.format.write_array_header_2_0(tokens, {"descr": np.dtype(np.uint16).str, "fortran_order": False, "shape": (end - start,)})
        skip = start
        if isinstance(stream, io.BufferedReader):  # a raw file: jump; compressed streams are read through
            stream.seek(start)
            skip = 0
        while skip > 0:
            skip -= len(stream.read(min(skip, CHUNK_BYTES)))
        while offset < end - start:
            chunk = np.frombuffer(stream.read(min(CHUNK_BYTES, end - start - offset)), dtype=np.uint8)
            if len(chunk) == 0:
                raise ValueError(f"Data file '{path}' ended before byte {end}; it changed while being read.")
            tokens.write((chunk.astype(np.uint16) + BYTE_OFFSET).tobytes())
            space = WHITESPACE[chunk]
            # a word starts at a non-space byte after a space (or at the start)
            starts = ~space & np.concatenate([[previous_space], space[:-1]])
            words += int(starts.sum())
            previous_space = bool(space[-1])
            offset += len(chunk)
    return words, end - start


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
        """The split's tokens, memory-mapped from the cache; a first use writes them chunk by chunk
        (`write_byte_tokens`), so neither building nor reading needs memory that grows with the file."""
        check_split_name(name)
        key = fingerprint("enwik8", file_identity(self.path), name)
        return replace(cached_split(self.cache_dir, key, write_tokens=lambda target: self._write(name, target)), name=name)

    def _write(self, name: str, target: Path) -> tuple[int, int]:
        start, end = split_bounds(stream_length(self.path))[name]
        return write_byte_tokens(self.path, start, end, target)
