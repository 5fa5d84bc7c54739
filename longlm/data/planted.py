"""Facts planted in real text: the examples of the long-range retrieval and needle-QA tasks.

A *haystack* is real text (any byte file, split 90/5/5 like enwik8, or the books of a PG-19 split). A fact
"The key of Alice is 73419. " is written into it, and `distance` tokens after the key's first digit the
query "The key of Alice is " asks for it again: the model must complete 73419 exactly. With
`num_facts > 1` other names' keys are planted too (distractors), and only one is queried.

Tokens are bytes (ByT5 ids: byte + 3), the vocabulary every longlm preset trains on with `enwik8`. Every
retrieval example is one document whose length is a whole number of segments, so it starts a segment and
the memory is reset at its start; its query ends the last segment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from longlm.data.enwik8 import BYTE_OFFSET, read_bytes, split_bounds
from longlm.data.pg19 import PG19Corpus

NAMES = (
    "Alice", "Bram", "Cora", "Dev", "Elin", "Finn", "Gita", "Hugo", "Ines", "Jon", "Kira", "Lars",
    "Mona", "Nils", "Olga", "Pia", "Quin", "Rosa", "Sven", "Tara", "Ugo", "Vera", "Wim", "Yara",
)
FACT = "The key of {name} is {key}. "
QUERY = "The key of {name} is "
ANSWER_END = ". "  # what follows the answer (so the answer is a whole number, not a prefix of one)


def to_ids(text: bytes | str) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def to_text(ids: np.ndarray) -> str:
    return bytes((np.asarray(ids) - BYTE_OFFSET).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class Haystack:
    """Real text to hide facts in: one split of one or more sources (byte files or PG-19 folders).

    A file is cut 90/5/5 into train/validation/test as the enwik8 protocol does; a PG-19 folder gives the
    books of its `split` subfolder. Samples are contiguous slices of one text, drawn with the caller's RNG.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], split: str = "train") -> None:
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("Haystack needs at least one text file or PG-19 folder; got none.")
        self.split = split
        self.texts: list[bytes] = []
        for path in map(Path, paths):
            self.texts.extend(self._read(path, split))
        self.sources = [str(p) for p in paths]
        self._weights = np.array([len(t) for t in self.texts], dtype=np.float64)
        self._weights /= self._weights.sum()

    @staticmethod
    def _read(path: Path, split: str) -> list[bytes]:
        if not path.exists():
            raise FileNotFoundError(f"Haystack path '{path}' does not exist; expected a text file or a PG-19 folder.")
        if path.is_dir():
            corpus = PG19Corpus(path, cache_dir=path)  # no cache is written: only the books are read
            corpus.check_splits([split])
            texts = [corpus.read(book).encode("utf-8") for book in corpus.books(split)]
        else:
            data = read_bytes(path)
            start, end = split_bounds(len(data))[split]
            texts = [data[start:end]]
        texts = [t for t in texts if t]
        if not texts or max(len(t) for t in texts) < 4096:
            raise ValueError(f"Haystack '{path}' ({split} split) holds less than 4,096 bytes of text in one piece; expected a longer text.")
        return texts

    def as_split(self) -> "CorpusSplit":
        """The texts as one byte-token split (a document per text), for held-apart LM evaluation."""
        from longlm.data.corpus import CorpusSplit

        joined = b"".join(self.texts)
        starts = np.cumsum([0] + [len(t) for t in self.texts[:-1]]).astype(np.int64)
        return CorpusSplit(tokens=to_ids(joined), doc_starts=starts, num_words=len(joined.split()), num_bytes=len(joined), name=self.split)

    def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` consecutive token ids of one text (a text shorter than that is repeated)."""
        text = self.texts[int(rng.choice(len(self.texts), p=self._weights))]
        if len(text) <= length:
            text = text * (length // len(text) + 1)
        start = int(rng.integers(0, len(text) - length + 1))
        return to_ids(text[start : start + length])


@dataclass(frozen=True)
class RetrievalExample:
    """One document: `ids` (a whole number of segments) with the queried key at `key_at` and its recall at
    `answer_at` (the key's digits are `ids[answer_at : answer_at + len(key)]`); `distance = answer_at - key_at`."""

    ids: np.ndarray
    key: str
    key_at: int
    answer_at: int
    num_facts: int

    @property
    def distance(self) -> int:
        return self.answer_at - self.key_at

    @property
    def answer_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.ids), dtype=bool)
        mask[self.answer_at : self.answer_at + len(self.key)] = True
        return mask


def example_length(distance_tokens: int, seg_len: int, key_digits: int, num_facts: int = 1) -> int:
    """Tokens of every example at this distance: the longest fact + the distance + the answer's tail, plus
    room for the distractor facts, rounded up to whole segments (the same for every name, so examples of
    one distance batch together)."""
    longest = max(len(FACT.format(name=n, key="0" * key_digits)) for n in NAMES)
    return math.ceil((distance_tokens + num_facts * longest + len(ANSWER_END)) / seg_len) * seg_len


def retrieval_example(
    haystack: Haystack,
    rng: np.random.Generator,
    *,
    seg_len: int,
    distance: float,
    num_facts: int = 1,
    key_digits: int = 5,
) -> RetrievalExample:
    """A planted fact recalled `distance` segments (of `seg_len` tokens) later, at the end of the document."""
    tokens = round(distance * seg_len)
    longest_query = max(len(QUERY.format(name=n)) for n in NAMES)
    if tokens < longest_query + key_digits + len(ANSWER_END):
        raise ValueError(
            f"distance {distance} x seg_len {seg_len} = {tokens} tokens is shorter than the fact and the query need "
            f"({longest_query + key_digits + len(ANSWER_END)}); expected a longer distance or segment."
        )
    if not 1 <= num_facts <= len(NAMES):
        raise ValueError(f"num_facts must be between 1 and {len(NAMES)}, got {num_facts}.")
    length = example_length(tokens, seg_len, key_digits, num_facts)
    names = [NAMES[i] for i in rng.choice(len(NAMES), size=num_facts, replace=False)]
    keys = ["".join(str(d) for d in rng.integers(0, 10, size=key_digits)) for _ in names]
    ids = haystack.sample(rng, length).copy()
    answer_at = length - len(ANSWER_END) - key_digits
    tail = to_ids(QUERY.format(name=names[0]) + keys[0] + ANSWER_END)
    query_at = length - len(tail)
    ids[query_at:] = tail
    fact = to_ids(FACT.format(name=names[0], key=keys[0]))
    key_at = answer_at - tokens
    fact_at = key_at - len(QUERY.format(name=names[0]))
    ids[fact_at : fact_at + len(fact)] = fact
    for at, other in distractor_places(rng, [(0, fact_at), (fact_at + len(fact), query_at)], names[1:], keys[1:]):
        ids[at : at + len(other)] = other
    return RetrievalExample(ids=ids, key=keys[0], key_at=key_at, answer_at=answer_at, num_facts=num_facts)


def distractor_places(rng: np.random.Generator, regions: list[tuple[int, int]], names: Sequence[str], keys: Sequence[str]):
    """(position, ids) for each distractor fact, spread over the free regions (before and after the queried
    fact, so "the most recent fact" is not the answer): each goes to a region with room for it, chosen in
    proportion to the room left, and the facts of a region are laid out with random gaps."""
    facts = [to_ids(FACT.format(name=n, key=k)) for n, k in zip(names, keys)]
    room = [end - start for start, end in regions]
    members: list[list[np.ndarray]] = [[] for _ in regions]
    for fact in facts:
        fits = [i for i, r in enumerate(room) if r >= len(fact)]
        if not fits:
            raise ValueError(f"{len(facts) + 1} facts do not fit in the example; expected fewer facts or a longer distance.")
        weights = np.array([room[i] for i in fits], dtype=np.float64)
        chosen = fits[int(rng.choice(len(fits), p=weights / weights.sum()))]
        members[chosen].append(fact)
        room[chosen] -= len(fact)
    places = []
    for (start, end), group in zip(regions, members):
        gaps = np.sort(rng.integers(0, end - start - sum(map(len, group)) + 1, size=len(group)))
        at = start
        for gap, fact in zip(np.diff(np.concatenate([[0], gaps])), group):
            at += int(gap)
            places.append((at, fact))
            at += len(fact)
    return places


def plain_document(haystack: Haystack, rng: np.random.Generator, length: int) -> RetrievalExample:
    """Haystack text with nothing planted (the plain-LM share of training): an example with no answer."""
    return RetrievalExample(ids=haystack.sample(rng, length), key="", key_at=length, answer_at=length, num_facts=0)


class PlantedStreams:
    """Batch rows, each an endless run of documents, cut into segments the way `SegmentStreams` cuts a
    corpus: `next_segment()` gives `input_ids`/`labels` (B, L), `answer_mask` (B, L: the label is an answer
    digit), `document_starts`, `new_document` and the segment index. Documents come from `draw(rng)`, so the
    mix (and a curriculum) can change while training; every document is a whole number of segments."""

    def __init__(self, draw, rows: int, seg_len: int, seed: int) -> None:
        self.draw, self.rows, self.seg_len = draw, rows, seg_len
        self.rng = np.random.default_rng(seed)
        self.index = 0
        self._ids = [np.zeros(0, dtype=np.int64) for _ in range(rows)]
        self._answers = [np.zeros(0, dtype=bool) for _ in range(rows)]
        self._starts = [np.zeros(0, dtype=bool) for _ in range(rows)]

    def _fill(self, row: int) -> None:
        while len(self._ids[row]) < self.seg_len + 1:
            doc = self.draw(self.rng)
            if len(doc.ids) % self.seg_len:
                raise ValueError(f"a planted document has {len(doc.ids)} tokens; expected a multiple of seg_len {self.seg_len}.")
            start = np.zeros(len(doc.ids), dtype=bool)
            start[0] = True
            self._ids[row] = np.concatenate([self._ids[row], doc.ids])
            self._answers[row] = np.concatenate([self._answers[row], doc.answer_mask])
            self._starts[row] = np.concatenate([self._starts[row], start])

    def next_segment(self) -> dict:
        import torch

        windows, answers, starts = [], [], []
        for row in range(self.rows):
            self._fill(row)
            windows.append(self._ids[row][: self.seg_len + 1])
            answers.append(self._answers[row][1 : self.seg_len + 1])
            starts.append(self._starts[row][: self.seg_len])
            self._ids[row] = self._ids[row][self.seg_len :]
            self._answers[row] = self._answers[row][self.seg_len :]
            self._starts[row] = self._starts[row][self.seg_len :]
        window = torch.from_numpy(np.stack(windows))
        document_starts = torch.from_numpy(np.stack(starts))
        batch = {
            "input_ids": window[:, :-1],
            "labels": window[:, 1:],
            "answer_mask": torch.from_numpy(np.stack(answers)),
            "document_starts": document_starts,
            "new_document": document_starts[:, 0] | (self.index == 0),
            "segment": self.index,
        }
        self.index += 1
        return batch


def example_segments(examples: Sequence[RetrievalExample], seg_len: int) -> list[dict]:
    """Examples of one length as a batch (one row each), segment by segment, in the `next_segment` format;
    the last label of each row (past the document) is the end of the answer's tail, masked out of the answer."""
    import torch

    lengths = {len(e.ids) for e in examples}
    if len(lengths) != 1:
        raise ValueError(f"examples of one batch must have one length; got {sorted(lengths)}.")
    ids = np.stack([e.ids for e in examples])
    answers = np.stack([e.answer_mask for e in examples])
    ids = np.concatenate([ids, ids[:, -1:]], axis=1)  # a last target for the last input (never an answer)
    answers = np.concatenate([answers, np.zeros((len(examples), 1), dtype=bool)], axis=1)
    segments = []
    for index in range(len(examples[0].ids) // seg_len):
        begin = index * seg_len
        window = torch.from_numpy(ids[:, begin : begin + seg_len + 1])
        starts = torch.zeros(len(examples), seg_len, dtype=torch.bool)
        starts[:, 0] = index == 0
        segments.append({
            "input_ids": window[:, :-1],
            "labels": window[:, 1:],
            "answer_mask": torch.from_numpy(answers[:, begin + 1 : begin + seg_len + 1]),
            "document_starts": starts,
            "new_document": starts[:, 0].clone(),
            "segment": index,
        })
    return segments


# --- needle QA (encoders) -----------------------------------------------------------------------------------
NEEDLE_QUESTION = "What is the key of {name}?"


def needle_qa_examples(
    haystack: Haystack,
    *,
    num_examples: int,
    context_bytes: int,
    seed: int,
    no_answer_fraction: float = 0.3,
    key_digits: int = 5,
    num_distractors: int = 0,
    positions: Sequence[float] | None = None,
) -> dict:
    """SQuAD v2 JSON (`{"version", "data": [{"title", "paragraphs": [...]}]}`) whose contexts are about
    `context_bytes` bytes of real text with the fact "The key of NAME is KEY." planted at a relative position
    (from `positions`, cycled, else uniform) and `num_distractors` other names' facts at uniform positions,
    so that finding *a* fact is not enough: the model must match the question's name. A
    `no_answer_fraction` of the questions ask for a name whose fact is absent (another name's fact stands
    where it would have been). Each question records its needle's relative position in `needle_position`
    (None when unanswerable)."""
    if num_distractors < 0 or num_distractors + 2 > len(NAMES):
        raise ValueError(f"needle_qa_examples: num_distractors must be in [0, {len(NAMES) - 2}], got {num_distractors!r}.")
    rng = np.random.default_rng(seed)
    paragraphs = []
    for index in range(num_examples):
        asked, other, *distractors = [NAMES[i] for i in rng.choice(len(NAMES), size=2 + num_distractors, replace=False)]
        answerable = bool(rng.random() >= no_answer_fraction)
        keys = ["".join(str(d) for d in rng.integers(0, 10, size=key_digits)) for _ in range(1 + num_distractors)]
        where = positions[index % len(positions)] if positions else float(rng.random())
        facts = [(where, FACT.format(name=asked if answerable else other, key=keys[0]), True)]
        facts += [(float(rng.random()), FACT.format(name=name, key=key), False) for name, key in zip(distractors, keys[1:])]
        planted_bytes = sum(len(fact) for _, fact, _ in facts)
        text = to_text(haystack.sample(rng, max(1, context_bytes - planted_bytes))).replace("\ufffd", " ")
        cuts = []
        for relative, fact, is_needle in facts:
            cut = int(relative * len(text))
            cut = text.rfind(" ", 0, cut) + 1 if " " in text[:cut] else cut  # at a word start
            cuts.append((cut, is_needle, fact))
        pieces, answer_start, needle_at, previous = [], None, None, 0
        for cut, is_needle, fact in sorted(cuts, key=lambda c: (c[0], not c[1])):
            pieces.append(text[previous:cut])
            previous = cut
            if is_needle:
                needle_at = sum(len(piece) for piece in pieces)
                answer_start = needle_at + len(fact) - len(keys[0]) - len(ANSWER_END)
            pieces.append(fact)
        pieces.append(text[previous:])
        context = "".join(pieces)
        assert context[answer_start : answer_start + key_digits] == keys[0]
        qa = {
            "id": f"needle-{seed}-{index}",
            "question": NEEDLE_QUESTION.format(name=asked),
            "answers": [{"text": keys[0], "answer_start": answer_start}] if answerable else [],
            "is_impossible": not answerable,
            "needle_position": round(needle_at / max(len(context), 1), 4) if answerable else None,
        }
        paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "v2.0", "data": [{"title": "needle", "paragraphs": paragraphs}]}


__all__ = [
    "Haystack", "RetrievalExample", "retrieval_example", "plain_document", "PlantedStreams", "example_segments",
    "example_length", "needle_qa_examples", "to_ids", "to_text", "NAMES", "FACT", "QUERY",
]
