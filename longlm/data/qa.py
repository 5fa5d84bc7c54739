"""Extractive QA data: SQuAD v1.1/v2.0 and TriviaQA files -> examples -> windows of question + context.

Windows are the fast tokenizer's own overflow (`truncation="only_second"` with `stride`, the call HF's
run_qa and question-answering pipeline make), so a question + context that fits `max_length` (4k, 16k
tokens) is ONE window and a longer one becomes windows sharing `stride` context tokens. Answer character
spans map to token spans through the offsets; `postprocess` merges all windows of an example back to text.

Validation is strict because a silently shifted answer trains the model on the wrong span: every answer
must sit at its `answer_start`. Two real-data cases are handled explicitly rather than rejected:
answers with leading/trailing whitespace are trimmed to their first/last visible character (the official
SQuAD train set has some), and TriviaQA's SQuAD-style conversion (Longformer's) stores the lower-cased
normalised alias as the answer text, so for files whose questions carry `aliases` the match ignores case and
the answer text becomes what the context holds.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from longlm.data.encoder_tokens import require_fast
from longlm.data.qa_spans import best_span

logger = logging.getLogger(__name__)

FORMATS = ("auto", "squad", "triviaqa")
_CHUNK = 64  # examples tokenized at once: bounds the transient Python lists of a 16k-token batch


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[dict]  # [{"text": str, "answer_start": int}], [] for no-answer
    is_impossible: bool = False
    aliases: list[str] | None = None  # TriviaQA: every accepted answer string (scored with max over them)


# ----------------------------------------------------------------------------------------------- loading


def _read_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file '{path}' does not exist.")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"QA file '{path}' is not UTF-8 text (byte {error.start} cannot be decoded); expected a SQuAD or "
            f"TriviaQA JSON file."
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"QA file '{path}' is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None


def _field(obj, key: str, kind: type | tuple, path, who: str):
    """obj[key] checked for presence and type, or one sentence naming the file, the holder and the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"QA file '{path}': {who} has no '{key}' field.")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"QA file '{path}': {who} has '{key}' of type {type(value).__name__}, expected {names}.")
    return value


def _question(holder, key: str, path, qid: str) -> str:
    """The question text; an empty one would train (and score) an answer to nothing."""
    question = _field(holder, key, str, path, f"question '{qid}'")
    if not question.strip():
        raise ValueError(f"QA file '{path}': question '{qid}' has an empty or whitespace-only question text.")
    return question


def _read_evidence(file: Path, who: str) -> str:
    """An evidence document's text, or one sentence naming it when it is not UTF-8."""
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"TriviaQA evidence file '{file}' of {who} is not UTF-8 text (byte {error.start} cannot be decoded)."
        ) from None


def _nonempty(examples: list[QAExample], path) -> list[QAExample]:
    """A file without examples is a wrong file or a failed export, never something to train or score on."""
    if not examples:
        raise ValueError(f"QA file '{path}' holds no examples; expected at least one question with its context.")
    return examples


def _checked_answer(answer, context: str, path, qid: str, ignore_case: bool) -> dict:
    """The answer as found in the context, trimmed of surrounding whitespace; one sentence if it is not there."""
    text = _field(answer, "text", str, path, f"an answer of question '{qid}'")
    start = _field(answer, "answer_start", int, path, f"an answer of question '{qid}'")
    if not 0 <= start <= len(context) - len(text):
        raise ValueError(
            f"QA file '{path}': question '{qid}' has answer_start {start} for answer {text!r}, which does not fit "
            f"in its context of {len(context)} characters."
        )
    held = context[start : start + len(text)]
    if held != text and not (ignore_case and held.lower() == text.lower()):
        raise ValueError(
            f"QA file '{path}': question '{qid}' has answer_start {start} for answer {text!r}, but its context "
            f"holds {held!r} there."
        )
    if not held.strip():
        raise ValueError(f"QA file '{path}': question '{qid}' has an empty answer text at answer_start {start}.")
    lead = len(held) - len(held.lstrip())
    return {"text": held.strip(), "answer_start": start + lead}


def _squad_examples(doc, path, require_aliases: bool) -> list[QAExample]:
    """SQuAD layout `data[].paragraphs[].{context, qas[].{id, question, answers, is_impossible?, aliases?}}`."""
    examples: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(_field(doc, "data", list, path, "the top level")):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, f"article {a}")):
            where = f"paragraph {p} of article {a}"
            context = _field(paragraph, "context", str, path, where)
            for qa in _field(paragraph, "qas", list, path, where):
                qid = str(_field(qa, "id", (str, int), path, f"a question of {where}"))
                if qid in seen:
                    raise ValueError(f"QA file '{path}' has question id '{qid}' twice; predictions are keyed by id.")
                seen.add(qid)
                who = f"question '{qid}'"
                question = _question(qa, "question", path, qid)
                aliases = None
                if require_aliases or "aliases" in qa:
                    aliases = [str(alias) for alias in _field(qa, "aliases", list, path, who)]
                given = _field(qa, "answers", list, path, who)
                answers = [_checked_answer(answer, context, path, qid, ignore_case=aliases is not None) for answer in given]
                # v1.1 has no is_impossible; a TriviaQA question always has an answer, found in the text or not
                impossible = qa.get("is_impossible", not answers if aliases is None else False)
                if impossible and answers:
                    raise ValueError(f"QA file '{path}': {who} is marked is_impossible but lists {len(answers)} answers.")
                if not impossible and not answers and aliases is None:
                    raise ValueError(f"QA file '{path}': {who} is marked answerable but lists no answers.")
                examples.append(QAExample(qid, question, context, answers, bool(impossible), aliases))
    return examples


def load_squad(path) -> list[QAExample]:
    """SQuAD v1.1 or v2.0 JSON (also any file in that layout, such as the TriviaQA conversion)."""
    return _nonempty(_squad_examples(_read_json(path), path, require_aliases=False), path)


def _alias_spans(strings: list[str], context: str) -> list[dict]:
    """Every case-insensitive whole-word occurrence of any alias, longest alias first where they overlap
    (TriviaQA's distant supervision; word boundaries keep "ice" out of "police")."""
    words = sorted({s.strip() for s in strings if s.strip()}, key=len, reverse=True)
    if not words:
        return []
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)
    return [{"text": match.group(), "answer_start": match.start()} for match in pattern.finditer(context)]


def _triviaqa_official(doc, path, evidence_dir) -> list[QAExample]:
    """The release's `{"Data": [...]}` with evidence text read from `evidence_dir/{wikipedia,web}/Filename`.

    Ids follow the official evaluation keys: Wikipedia questions are one example each (their entity pages
    joined by blank lines: one long document), Web questions one example per (question, document) as
    `"{QuestionId}--{Filename}"`. The whole evidence is kept (no 800-token cut: windows handle length)."""
    if evidence_dir is None:
        raise ValueError(
            f"TriviaQA file '{path}' names evidence files; pass evidence_dir, the folder holding wikipedia/ and web/."
        )
    evidence_dir = Path(evidence_dir)
    verified = bool(doc.get("VerifiedEval", False))
    examples: list[QAExample] = []
    unlocated = 0
    for datum in _field(doc, "Data", list, path, "the top level"):
        qid = str(_field(datum, "QuestionId", (str, int), path, "a question"))
        if verified and not datum.get("QuestionPartOfVerifiedEval", True):
            continue
        who = f"question '{qid}'"
        question = _question(datum, "Question", path, qid)
        answer = _field(datum, "Answer", dict, path, who)
        raw = [str(a) for a in _field(answer, "Aliases", list, path, f"the Answer of {who}")]
        normalized = [str(a) for a in answer.get("NormalizedAliases", [])]
        human = [str(a) for a in answer.get("HumanAnswers", [])]
        aliases = (normalized or raw) + human  # what the official scorer compares against
        pages = [("wikipedia", page) for page in datum.get("EntityPages", [])]
        pages += [("web", page) for page in datum.get("SearchResults", [])]
        pages = [(folder, page) for folder, page in pages if not verified or page.get("DocPartOfVerifiedEval", True)]
        if not pages:
            raise ValueError(f"TriviaQA file '{path}': {who} lists no evidence in EntityPages or SearchResults.")
        documents = []
        for folder, page in pages:
            name = _field(page, "Filename", str, path, f"an evidence page of {who}")
            file = evidence_dir / folder / name
            if not file.is_file():
                raise FileNotFoundError(f"TriviaQA evidence file '{file}' of {who} does not exist.")
            documents.append((name, _read_evidence(file, who)))
        web = doc.get("Domain") == "Web" if "Domain" in doc else any(folder == "web" for folder, _ in pages)
        if web:
            groups = [(f"{qid}--{name}", text) for name, text in documents]
        else:
            groups = [(qid, "\n\n".join(text for _, text in documents))]
        for example_id, context in groups:
            spans = _alias_spans(raw + normalized + human, context)
            unlocated += not spans
            examples.append(QAExample(example_id, question, context, spans, False, aliases))
    if unlocated:
        logger.warning("TriviaQA file '%s': %d of %d examples have no alias in their evidence; kept without an answer span.",
                       path, unlocated, len(examples))
    return examples


def _triviaqa_from(doc, path, evidence_dir) -> list[QAExample]:
    if isinstance(doc, dict) and "Data" in doc:
        return _triviaqa_official(doc, path, evidence_dir)
    return _squad_examples(doc, path, require_aliases=True)


def load_triviaqa(path, evidence_dir=None) -> list[QAExample]:
    """TriviaQA: the official JSON (evidence from `evidence_dir`, answers = alias occurrences in it) or the
    SQuAD-style conversion Longformer used (questions carry `aliases`)."""
    return _nonempty(_triviaqa_from(_read_json(path), path, evidence_dir), path)


def _has_aliases(doc) -> bool:
    for article in doc.get("data", []) if isinstance(doc, dict) else []:
        for paragraph in article.get("paragraphs", []) if isinstance(article, dict) else []:
            for qa in paragraph.get("qas", []) if isinstance(paragraph, dict) else []:
                return isinstance(qa, dict) and "aliases" in qa
    return False


def load_qa_examples(path, format: str = "auto", evidence_dir=None) -> list[QAExample]:
    """Examples of a SQuAD or TriviaQA file; "auto" tells them apart by layout (official TriviaQA has
    `Data`, its SQuAD-style conversion has `aliases` on the questions)."""
    if format not in FORMATS:
        raise ValueError(f"QA format must be one of {', '.join(FORMATS)}, got {format!r}.")
    doc = _read_json(path)
    official = isinstance(doc, dict) and "Data" in doc
    if format == "squad" and official:
        raise ValueError(f"QA file '{path}' is official TriviaQA JSON (top-level 'Data'), not SQuAD; use format='triviaqa'.")
    if format == "triviaqa" or (format == "auto" and (official or _has_aliases(doc))):
        return _nonempty(_triviaqa_from(doc, path, evidence_dir), path)
    return _nonempty(_squad_examples(doc, path, require_aliases=False), path)


# ---------------------------------------------------------------------------------------------- features


class Ragged(Sequence):
    """Rows of different lengths in one flat array: Python lists cost ~36 bytes a token (~120 an offset
    pair), gigabytes for a long-document training set. `rows[i]` is a list; `rows.array(i)` a numpy view."""

    def __init__(self, rows: list[np.ndarray], dtype, width: int | None = None) -> None:
        shape = (0,) if width is None else (0, width)
        self.flat = np.concatenate(rows).astype(dtype, copy=False) if rows else np.zeros(shape, dtype)
        self.bounds = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in rows], out=self.bounds[1:])

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def array(self, index: int) -> np.ndarray:
        index = range(len(self))[index]
        return self.flat[self.bounds[index] : self.bounds[index + 1]]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return self.array(index).tolist()


class OffsetRows(Ragged):
    """Character offsets per token, `(start, end)` into the context, None for question/special tokens."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return [None if start < 0 else (start, end) for start, end in self.array(index).tolist()]


@dataclass
class QAFeatureStats:
    examples: int
    features: int
    strided_examples: int  # examples split into more than one window
    answers_outside_window: int  # answerable examples no window of which holds a whole answer (labelled no-answer)
    answers_not_found: int = 0  # answerable examples without any answer span (TriviaQA: no alias in the evidence)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class QAFeatures(Dataset):
    """The windows (a torch Dataset of unpadded LongTensors) plus what post-processing needs.

    `offset_mapping` is None for training features (HF's run_qa keeps none either): they are a third of the
    memory and only `postprocess` reads them."""

    input_ids: Ragged
    attention_mask: Ragged
    start_positions: list[int]  # token index; 0 (the <s>/CLS) for no answer in this window
    end_positions: list[int]
    example_index: list[int]  # feature -> index into the examples list
    offset_mapping: OffsetRows | None
    stats: QAFeatureStats

    def __len__(self) -> int:
        return len(self.example_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.input_ids.array(index).astype(np.int64)),
            "attention_mask": torch.from_numpy(self.attention_mask.array(index).astype(np.int64)),
            "start_positions": torch.tensor(self.start_positions[index], dtype=torch.long),
            "end_positions": torch.tensor(self.end_positions[index], dtype=torch.long),
        }


def _check_room(examples: list[QAExample], questions: list[str], tokenizer, max_length: int, stride: int) -> None:
    """One sentence instead of the tokenizer's truncation error (or Rust panic) when a question leaves too
    little of the window for context."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    for example, ids in zip(examples, tokenizer(questions, add_special_tokens=False)["input_ids"]):
        room = max_length - len(ids) - specials
        if room <= 0:
            raise ValueError(
                f"Question '{example.id}' takes {len(ids)} tokens plus {specials} special tokens, which leaves no "
                f"room for context within max_length={max_length}."
            )
        if stride >= room:
            raise ValueError(
                f"Question '{example.id}' takes {len(ids)} tokens plus {specials} special tokens, which leaves "
                f"{room} context tokens per window within max_length={max_length}, not more than stride={stride}."
            )


def _label(offsets: np.ndarray, answers: list[dict]) -> tuple[int, int] | None:
    """Token span of the first answer this window holds whole (the tokens overlapping its characters), or None."""
    context = np.flatnonzero(offsets[:, 0] >= 0)
    if not answers or context.size == 0:
        return None
    starts, ends = offsets[context, 0], offsets[context, 1]
    first_char, last_char = starts[0], ends[-1]
    for answer in answers:
        start = answer["answer_start"]
        end = start + len(answer["text"])
        if start < first_char or end > last_char:
            continue
        covering = context[(ends > starts) & (starts < end) & (ends > start)]
        if covering.size:
            return int(covering[0]), int(covering[-1])
    return None


def featurize(
    examples: list[QAExample], tokenizer, max_length: int, stride: int = 128, training: bool = True, truncate: bool = False
) -> QAFeatures:
    """Windows of question + context for every example (each keeps at least one), labelled with the answer's
    token span in windows that hold it whole and with 0 (<s>) elsewhere. `training=False` also keeps the
    character offsets `postprocess` needs. `truncate=True` keeps only each example's first window (a model
    that reads the first `max_length` tokens and nothing more: BERT-style truncation)."""
    require_fast(tokenizer, "Question answering")
    if max_length <= 0 or stride < 0:
        raise ValueError(f"featurize needs max_length > 0 and stride >= 0, got max_length={max_length}, stride={stride}.")
    ids_rows, offset_rows, starts, ends, example_index = [], [], [], [], []
    strided = outside = not_found = 0
    for first in range(0, len(examples), _CHUNK):
        chunk = examples[first : first + _CHUNK]
        questions = [example.question.lstrip() for example in chunk]  # leading spaces only cost tokens
        _check_room(chunk, questions, tokenizer, max_length, stride)
        encoded = tokenizer(
            questions, [example.context for example in chunk], truncation="only_second", max_length=max_length,
            stride=stride, return_overflowing_tokens=not truncate, return_offsets_mapping=True, padding=False,
        )
        mapping = list(range(len(chunk))) if truncate else encoded["overflow_to_sample_mapping"]
        windows = np.bincount(mapping, minlength=len(chunk))
        labelled = np.zeros(len(chunk), dtype=bool)
        for row, local in enumerate(mapping):
            offsets = np.asarray(encoded["offset_mapping"][row], dtype=np.int64).reshape(-1, 2)
            offsets[[sequence != 1 for sequence in encoded.sequence_ids(row)]] = -1
            span = _label(offsets, chunk[local].answers)
            labelled[local] |= span is not None
            start, end = span or (0, 0)
            ids_rows.append(np.asarray(encoded["input_ids"][row], dtype=np.int32))
            if not training:
                offset_rows.append(offsets.astype(np.int32))
            starts.append(start)
            ends.append(end)
            example_index.append(first + local)
        for local, example in enumerate(chunk):
            strided += windows[local] > 1
            if example.answers and not labelled[local]:
                outside += 1
            not_found += not example.answers and not example.is_impossible
    stats = QAFeatureStats(len(examples), len(example_index), int(strided), outside, not_found)
    if outside:
        logger.warning(
            "%d of %d answerable examples have no window holding a whole answer (max_length=%d, stride=%d); "
            "their windows are labelled no-answer.",
            outside, sum(bool(example.answers) for example in examples), max_length, stride,
        )
    return QAFeatures(
        input_ids=Ragged(ids_rows, np.int32),
        attention_mask=Ragged([np.ones(len(row), dtype=np.int8) for row in ids_rows], np.int8),
        start_positions=starts,
        end_positions=ends,
        example_index=example_index,
        offset_mapping=None if training else OffsetRows(offset_rows, np.int32, width=2),
        stats=stats,
    )


def collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Stack a batch of features, padding sequences to the longest (input_ids with `pad_token_id`, masks
    with 0), rounded up to `pad_to_multiple_of` for attention that works in blocks."""
    if not batch:
        raise ValueError("collate got an empty batch.")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id; the tokenizer has no pad token.")
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        length = max(len(value) for value in values)
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        padded = values[0].new_full((len(values), length), pad_token_id if key == "input_ids" else 0)
        for row, value in enumerate(values):
            padded[row, : len(value)] = value
        out[key] = padded
    return out


# ------------------------------------------------------------------------------------------ post-processing


def postprocess(
    examples: list[QAExample],
    features: QAFeatures,
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    n_best: int | None = None,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
    version_2: bool = True,
) -> tuple[dict[str, str], dict[str, float]]:
    """(predictions {id: answer text, "" for null}, null_odds {id: null score - best span score}).

    All windows of an example are merged: the best span over all of them (first window wins a tie), the null
    score the minimum over windows of the <s> start + end logits, as HF's run_qa does for SQuAD v2. With
    `version_2` the answer is "" when null score - best span score > `null_threshold`. An example with no
    valid span predicts "" with null odds +inf. Logit rows may be padded: only each window's tokens are read."""
    if features.offset_mapping is None:
        raise ValueError(
            "postprocess needs features built with featurize(..., training=False); training features keep no offsets."
        )
    for name, logits in (("start_logits", start_logits), ("end_logits", end_logits)):
        if len(logits) != len(features):
            raise ValueError(f"postprocess got {len(logits)} rows of {name} for {len(features)} features.")
    rows_of: dict[int, list[int]] = {}
    for row, index in enumerate(features.example_index):
        rows_of.setdefault(index, []).append(row)
    predictions: dict[str, str] = {}
    null_odds: dict[str, float] = {}
    for index, example in enumerate(examples):
        if index not in rows_of:
            raise ValueError(
                f"Example '{example.id}' has no feature; pass the features featurize built from these examples."
            )
        best, null_score = None, np.inf
        for row in rows_of[index]:
            offsets = features.offset_mapping.array(row)
            start = np.asarray(start_logits[row], dtype=np.float64).reshape(-1)
            end = np.asarray(end_logits[row], dtype=np.float64).reshape(-1)
            if min(len(start), len(end)) < len(offsets):
                raise ValueError(
                    f"Logits of feature {row} (example '{example.id}') are shorter than its {len(offsets)} tokens."
                )
            start, end = start[: len(offsets)], end[: len(offsets)]
            null_score = min(null_score, start[0] + end[0])
            span = best_span(start, end, offsets[:, 0] >= 0, max_answer_length, n_best)
            if span is not None and (best is None or span[0] > best[0]):
                best = (span[0], offsets[span[1], 0], offsets[span[2], 1])
        if best is None:
            predictions[example.id], null_odds[example.id] = "", float("inf")
            continue
        odds = float(null_score - best[0])
        predictions[example.id] = "" if version_2 and odds > null_threshold else example.context[best[1] : best[2]]
        null_odds[example.id] = odds
    return predictions, null_odds
