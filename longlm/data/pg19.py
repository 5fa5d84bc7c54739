"""PG-19 in its official layout: `train/ validation/ test/` of `{gutenberg_id}.txt` plus `metadata.csv`.

The subword tokenizer is trained on the train split (default 32k pieces) and cached; each book becomes one
document ending in `</s>`, books in id order. Word counts are whitespace-separated words of the raw text,
for word-level perplexity = exp(total NLL / words).

Books must be UTF-8: a book that is not is refused with its byte offset (`decode_errors="strict"`, the
default), or, with `decode_errors="replace"`, decoded with U+FFFD in place of the bad bytes and counted in
one warning, so that a damaged file never changes the training text without a word.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from longlm.data.cache import cached_split, file_identity, fingerprint
from longlm.data.corpus import CORPORA, CorpusSplit, TokenCorpus, check_decode_errors, check_split_name
from longlm.data.subword import MAX_PRETOKEN_CHARS, SPECIAL_TOKENS, train_bpe

_REPLACEMENT = "\ufffd"
_ENCODED_REPLACEMENT = _REPLACEMENT.encode("utf-8")


def _book_key(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.stem) if path.stem.isdigit() else (1 << 62, path.stem)


def decode_book(data: bytes, path: Path, errors: str = "strict") -> tuple[str, int]:
    """(text, characters replaced) of a book's bytes, with newlines translated as `Path.read_text` does.

    U+FFFD already in the file is encoded as EF BF BD, bytes that never belong to a bad sequence, so the
    replaced count is the U+FFFD in the text less those already in the bytes."""
    try:
        text, replaced = data.decode("utf-8"), 0
    except UnicodeDecodeError as error:
        if errors == "strict":
            raise ValueError(
                f"PG-19 book '{path}' is not valid UTF-8 at byte offset {error.start}; re-encode it as UTF-8 or "
                f"set data.decode_errors to 'replace' to decode it with U+FFFD replacement characters."
            ) from None
        text = data.decode("utf-8", errors="replace")
        replaced = text.count(_REPLACEMENT) - data.count(_ENCODED_REPLACEMENT)
    return text.replace("\r\n", "\n").replace("\r", "\n"), replaced


@CORPORA.register("pg19")
class PG19Corpus(TokenCorpus):
    def __init__(
        self, path, cache_dir=None, tokenizer=None, vocab_size: int = 32000, decode_errors: str = "strict", **_: object
    ) -> None:
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
        self.decode_errors = check_decode_errors(decode_errors)
        self._given_tokenizer = tokenizer
        self._reported: set[Path] = set()  # books already counted in a replacement warning

    def books(self, split: str) -> list[Path]:
        folder = self.path / split
        return sorted(folder.glob("*.txt"), key=_book_key) if folder.is_dir() else []

    def check_splits(self, names: Iterable[str]) -> None:
        """Each split must be a folder of .txt books: found at set-up, not when validation first runs."""
        for name in names:
            check_split_name(name)
            if not (self.path / name).is_dir():
                raise ValueError(
                    f"PG-19 folder '{self.path}' has no {name}/ subfolder; expected train/, validation/ and test/ "
                    f"of {{id}}.txt files."
                )
            if not self.books(name):
                raise ValueError(f"PG-19 folder '{self.path / name}' holds no .txt books.")

    @staticmethod
    def read(path: Path, errors: str = "strict") -> str:
        """One book's text; see `decode_book` for `errors`."""
        return decode_book(Path(path).read_bytes(), path, check_decode_errors(errors))[0]

    def _texts(self, books: list[Path]) -> Iterator[str]:
        """The books' texts, then ONE warning for the books of this pass not yet reported that needed
        replacement characters (the tokenizer and the train split read the same books)."""
        files = chars = 0
        for path in books:
            text, replaced = decode_book(path.read_bytes(), path, self.decode_errors)
            if replaced and path not in self._reported:
                self._reported.add(path)
                files, chars = files + 1, chars + replaced
            yield text
        if files:
            warnings.warn(
                f"PG-19 folder '{self.path}': {files} of {len(books)} books were not valid UTF-8 and "
                f"{chars} characters were replaced with U+FFFD (data.decode_errors='replace').",
                UnicodeWarning,
                stacklevel=2,
            )

    def _cache_parts(self) -> tuple:
        """Settings that change the text: only `replace` joins the keys, so existing caches stay valid and a
        strict run never reuses text that a replace run decoded."""
        return ("decode_errors=replace",) if self.decode_errors == "replace" else ()

    @cached_property
    def tokenizer(self):
        if self._given_tokenizer is not None:
            return self._given_tokenizer
        books = self.books("train")
        key = fingerprint(
            "pg19-bpe", self.vocab_size, f"pre-split={MAX_PRETOKEN_CHARS}", *self._cache_parts(),
            *(file_identity(p) for p in books),
        )
        folder = self.cache_dir / "tokenizers" / key
        folder.parent.mkdir(parents=True, exist_ok=True)
        return train_bpe(self._texts(books), self.vocab_size, folder)

    def split(self, name: str) -> CorpusSplit:
        check_split_name(name)
        self.check_splits([name])
        books = self.books(name)
        vocab_key = fingerprint(sorted(self.tokenizer.get_vocab().items()))
        key = fingerprint("pg19", name, vocab_key, *self._cache_parts(), *(file_identity(p) for p in books))
        return replace(cached_split(self.cache_dir, key, lambda: self._build(books)), name=name)

    def _build(self, books: list[Path]) -> CorpusSplit:
        pieces, starts, words, num_bytes, offset = [], [], 0, 0, 0
        eos = self.tokenizer.eos_token_id
        for text in self._texts(books):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            pieces.append(np.asarray(ids, dtype=np.int32))
            starts.append(offset)
            offset += len(ids)
            words += len(text.split())
            num_bytes += len(text.encode("utf-8"))
        return CorpusSplit(np.concatenate(pieces), np.asarray(starts, dtype=np.int64), words, num_bytes)
