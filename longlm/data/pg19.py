"""PG-19 in its official layout: `train/ validation/ test/` of `{gutenberg_id}.txt` plus `metadata.csv`.

The subword tokenizer is trained on the train split (default 32k pieces) and cached; each book becomes one
document ending in `</s>`, books in id order. Word counts are whitespace-separated words of the raw text,
for word-level perplexity = exp(total NLL / words).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from longlm.data.cache import cached_split, file_identity, fingerprint
from longlm.data.corpus import CORPORA, CorpusSplit, TokenCorpus, check_split_name
from longlm.data.subword import SPECIAL_TOKENS, train_bpe


def _book_key(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.stem) if path.stem.isdigit() else (1 << 62, path.stem)


@CORPORA.register("pg19")
class PG19Corpus(TokenCorpus):
    def __init__(self, path, cache_dir=None, tokenizer=None, vocab_size: int = 32000, **_: object) -> None:
        super().__init__(path, cache_dir)
        if not (self.path / "train").is_dir():
            raise ValueError(
                f"PG-19 folder '{self.path}' has no train/ subfolder; expected train/, validation/ and test/ of {{id}}.txt files."
            )
        if not self.books("train"):
            raise ValueError(f"PG-19 folder '{self.path / 'train'}' holds no .txt books.")
        if vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"PG-19 tokenizer vocab_size must exceed 259 (bytes + specials), got {vocab_size}.")
        self.vocab_size = vocab_size
        self._given_tokenizer = tokenizer

    def books(self, split: str) -> list[Path]:
        folder = self.path / split
        return sorted(folder.glob("*.txt"), key=_book_key) if folder.is_dir() else []

    @staticmethod
    def read(path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")

    @cached_property
    def tokenizer(self):
        if self._given_tokenizer is not None:
            return self._given_tokenizer
        key = fingerprint("pg19-bpe", self.vocab_size, *(file_identity(p) for p in self.books("train")))
        folder = self.cache_dir / "tokenizers" / key
        folder.parent.mkdir(parents=True, exist_ok=True)
        return train_bpe((self.read(p) for p in self.books("train")), self.vocab_size, folder)

    def split(self, name: str) -> CorpusSplit:
        check_split_name(name)
        books = self.books(name)
        if not books:
            raise ValueError(f"PG-19 folder '{self.path / name}' holds no .txt books.")
        vocab_key = fingerprint(sorted(self.tokenizer.get_vocab().items()))
        key = fingerprint("pg19", name, vocab_key, *(file_identity(p) for p in books))
        return cached_split(self.cache_dir, key, lambda: self._build(books))

    def _build(self, books: list[Path]) -> CorpusSplit:
        pieces, starts, words, num_bytes, offset = [], [], 0, 0, 0
        eos = self.tokenizer.eos_token_id
        for path in books:
            text = self.read(path)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            pieces.append(np.asarray(ids, dtype=np.int32))
            starts.append(offset)
            offset += len(ids)
            words += len(text.split())
            num_bytes += len(text.encode("utf-8"))
        return CorpusSplit(np.concatenate(pieces), np.asarray(starts, dtype=np.int64), words, num_bytes)

