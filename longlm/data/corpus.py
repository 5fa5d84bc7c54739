"""What every corpus provides: a tokenizer and, per split, a token array with its word count."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from longlm.registry import Registry

SPLITS = ("train", "validation", "test")
DECODE_ERRORS = ("strict", "replace")  # what a text corpus does with bytes that are not UTF-8


@dataclass
class CorpusSplit:
    """One split as the model sees it.

    `tokens` is a (memory-mapped) 1-D array; `doc_starts` the token offsets where documents begin (for
    per-row memory resets); `num_words` the whitespace-separated words of the raw text (PG-19 word-level
    perplexity) and `num_bytes` its UTF-8 size (bits per character on byte corpora). `name` is the split's
    name ("train", "validation", "test"), so that errors about its length can say which split it is.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    num_words: int
    num_bytes: int
    name: str = "split"


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

    def check_splits(self, names: Iterable[str]) -> None:
        """Refuse, before any step runs, a corpus that cannot provide these splits (default: every corpus can)."""
        for name in names:
            check_split_name(name)


def check_split_name(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"Unknown split '{name}'; expected one of {list(SPLITS)}.")


def check_decode_errors(value: object, field: str = "decode_errors") -> str:
    """`strict` refuses a text file that is not UTF-8, `replace` decodes it with U+FFFD and warns."""
    if value not in DECODE_ERRORS:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, DECODE_ERRORS))}, got {value!r}.")
    return value


def default_cache_dir() -> Path:
    """`$LONGLM_CACHE`, else `~/.cache/longlm`."""
    return Path(os.environ.get("LONGLM_CACHE", Path.home() / ".cache" / "longlm"))


CORPORA: Registry[type[TokenCorpus]] = Registry("dataset")
