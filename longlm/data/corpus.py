"""What every corpus provides: a tokenizer and, per split, a token array with its word count."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longlm.registry import Registry

SPLITS = ("train", "validation", "test")


@dataclass
class CorpusSplit:
    """One split as the model sees it.

    `tokens` is a (memory-mapped) 1-D array; `doc_starts` the token offsets where documents begin (for
    per-row memory resets); `num_words` the whitespace-separated words of the raw text (PG-19 word-level
    perplexity) and `num_bytes` its UTF-8 size (bits per character on byte corpora).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    num_words: int
    num_bytes: int


class TokenCorpus:
    """Base class of the corpora registered in `CORPORA` (`dataset:` in the data config)."""

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Data path '{self.path}' does not exist.")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    @property
    def tokenizer(self):
        raise NotImplementedError

    def split(self, name: str) -> CorpusSplit:
        raise NotImplementedError


def check_split_name(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"Unknown split '{name}'; expected one of {list(SPLITS)}.")


def default_cache_dir() -> Path:
    """`$LONGLM_CACHE`, else `~/.cache/longlm`."""
    return Path(os.environ.get("LONGLM_CACHE", Path.home() / ".cache" / "longlm"))


CORPORA: Registry[type[TokenCorpus]] = Registry("dataset")
