"""QA data on the real SQuAD v2 / long-document samples: loading, windows, labels through offsets, merging."""
from __future__ import annotations

import copy
import json
import logging
import re

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from longlm.data.encoder_tokens import with_encoder_tokens
from longlm.data.qa import (
    QAExample,
    collate,
    featurize,
    load_qa_examples,
    load_squad,
    load_triviaqa,
    postprocess,
)
from longlm.data.subword import train_bpe
from longlm.evaluation.qa_metrics import normalize_triviaqa
from tests.paths import (
    LONG_DEV,
    LONG_TRAIN,
    PG19_SAMPLE,
    SQUAD2_DEV,
    SQUAD2_TRAIN,
    requires_qa_data,
    requires_shared_data,
)

pytestmark = [requires_qa_data, requires_shared_data]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real byte-level BPE (1,500 pieces) trained on the PG-19 sample, with `<s> Q </s></s> C </s>`."""
    books = sorted((PG19_SAMPLE / "train").glob("*.txt"))
    trained = train_bpe((book.read_text(encoding="utf-8") for book in books), 1500, tmp_path_factory.mktemp("qa-bpe") / "bpe")
    assert isinstance(trained, PreTrainedTokenizerFast)
    return with_encoder_tokens(trained)


@pytest.fixture(scope="module")
def squad_dev() -> list[QAExample]:
    return load_squad(SQUAD2_DEV)


@pytest.fixture(scope="module")
def long_dev() -> list[QAExample]:
    return load_qa_examples(LONG_DEV)


def _answerable(examples: list[QAExample]) -> list[QAExample]:
    return [example for example in examples if example.answers]


def _context_offsets(features, row: int) -> list[tuple[int, int]]:
    return [offset for offset in features.offset_mapping[row] if offset is not None]


def _recovered(features, row: int, context: str) -> str:
    """The context text of a window's labelled token span, through its offsets."""
    offsets = features.offset_mapping[row]
    return context[offsets[features.start_positions[row]][0] : offsets[features.end_positions[row]][1]]


def _logits(features, peaks: dict[int, tuple[int, int, float]], null: dict[int, float] | None = None):
    """Zero logits with start/end peaks {row: (start token, end token, value)} and <s> logits {row: value}."""
    starts, ends = [], []
    for row in range(len(features)):
        start, end = np.zeros(len(features.input_ids.array(row))), np.zeros(len(features.input_ids.array(row)))
        if row in peaks:
            first, last, value = peaks[row]
            start[first] = end[last] = value
        start[0] = end[0] = (null or {}).get(row, 0.0)
        starts.append(start)
        ends.append(end)
    return starts, ends


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("path", [SQUAD2_DEV, SQUAD2_TRAIN, LONG_DEV, LONG_TRAIN], ids=lambda p: p.stem)
def test_every_real_answer_passes_validation_and_loads_unchanged(path):
    raw = {qa["id"]: (paragraph["context"], qa) for article in json.loads(path.read_text())["data"]
           for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    examples = load_qa_examples(path)
    assert [example.id for example in examples] == list(raw)
    for example in examples:
        context, qa = raw[example.id]
        assert example.context == context and example.question == qa["question"]
        assert example.answers == qa["answers"] and example.is_impossible == qa["is_impossible"]
        assert example.is_impossible == (not example.answers) and example.aliases is None
    assert sum(example.is_impossible for example in examples) == sum(qa["is_impossible"] for _, qa in raw.values())


def test_answers_with_surrounding_whitespace_are_trimmed_to_the_visible_span(tmp_path, squad_dev):
    example = _answerable(squad_dev)[0]
    start = example.answers[0]["answer_start"] - 1  # the space before "English", as some official SQuAD answers have
    text = example.context[start : start + len(example.answers[0]["text"]) + 1]
    assert text.startswith(" ")
    doc = {"data": [{"paragraphs": [{"context": example.context, "qas": [
        {"id": example.id, "question": example.question, "answers": [{"text": text, "answer_start": start}],
         "is_impossible": False}]}]}]}
    (tmp_path / "padded.json").write_text(json.dumps(doc))
    assert load_squad(tmp_path / "padded.json")[0].answers == example.answers


# ------------------------------------------------------------------------------------------------ features


@pytest.mark.parametrize(
    "path, count, max_length, stride", [(SQUAD2_DEV, 200, 384, 128), (LONG_DEV, 50, 2048, 256)], ids=["squad2-dev", "long-dev"]
)
def test_answer_spans_map_back_through_offsets(tokenizer, path, count, max_length, stride):
    examples = _answerable(load_qa_examples(path))[:count]
    features = featurize(examples, tokenizer, max_length, stride, training=False)
    assert features.stats.answers_outside_window == 0 and features.stats.examples == count
    exact = covering = 0
    labelled = set()
    for row in range(len(features)):
        example = examples[features.example_index[row]]
        answer = example.answers[0]
        first, last = answer["answer_start"], answer["answer_start"] + len(answer["text"])
        offsets = features.offset_mapping[row]
        context = _context_offsets(features, row)
        start, end = features.start_positions[row], features.end_positions[row]
        if (start, end) == (0, 0):  # only windows that do not hold the whole answer are labelled no-answer
            assert not (context[0][0] <= first and last <= context[-1][1])
            continue
        labelled.add(features.example_index[row])
        recovered = example.context[offsets[start][0] : offsets[end][1]]
        visible = [offset for offset in context if offset[1] > offset[0]]
        if any(o[0] == first for o in visible) and any(o[1] == last for o in visible):
            assert recovered == answer["text"]
            exact += 1
        else:  # the answer starts or ends inside a token: the smallest span of whole tokens covering it
            assert offsets[start][0] <= first < offsets[start][1] and offsets[end][0] < last <= offsets[end][1]
            assert answer["text"] in recovered
            covering += 1
    assert labelled == set(range(count))
    assert exact >= 0.9 * (exact + covering)


def test_a_long_document_that_fits_max_length_is_one_window(tokenizer, long_dev):
    example = _answerable(long_dev)[0]
    length = len(tokenizer(example.question.lstrip(), example.context)["input_ids"])
    assert length > 4000
    features = featurize([example], tokenizer, max_length=length, stride=128, training=False)
    assert len(features) == 1 and len(features[0]["input_ids"]) == length and features.stats.strided_examples == 0
    context = _context_offsets(features, 0)
    assert context[0][0] == 0 and context[-1][1] == len(example.context.rstrip())
    assert _recovered(features, 0, example.context) == example.answers[0]["text"]
    assert len(featurize([example], tokenizer, max_length=length - 1, stride=128, training=False)) == 2


def test_a_16k_token_document_is_one_window_at_max_length_16384(tokenizer, long_dev):
    target = _answerable(long_dev)[1]
    others = list(dict.fromkeys(e.context for e in long_dev if e.context != target.context))
    prefix = ""
    for context in others:  # real passages in front of the gold one, as many as fit 16k tokens
        candidate = prefix + context + "\n\n"
        if len(tokenizer(target.question.lstrip(), candidate + target.context)["input_ids"]) > 16384:
            break
        prefix = candidate
    answer = target.answers[0]
    shifted = {"text": answer["text"], "answer_start": answer["answer_start"] + len(prefix)}
    example = QAExample("long-16k", target.question, prefix + target.context, [shifted])
    assert example.context[shifted["answer_start"] :].startswith(answer["text"])
    features = featurize([example], tokenizer, max_length=16384, stride=256, training=False)
    assert len(features) == 1 and 12000 < len(features[0]["input_ids"]) <= 16384
    assert _recovered(features, 0, example.context) == answer["text"]


def test_long_documents_are_strided_and_postprocess_merges_windows(tokenizer, long_dev):
    example = _answerable(long_dev)[2]
    features = featurize([example], tokenizer, max_length=512, stride=128, training=False)
    assert len(features) > 5 and features.stats.strided_examples == 1
    for row in range(len(features) - 1):  # consecutive windows share exactly `stride` context tokens
        assert _context_offsets(features, row)[-128:] == _context_offsets(features, row + 1)[:128]
        ids, following = features.input_ids.array(row), features.input_ids.array(row + 1)
        assert ids[-129:-1].tolist() == following[np.flatnonzero(features.offset_mapping.array(row + 1)[:, 0] >= 0)[:128]].tolist()
    assert _context_offsets(features, 0)[0][0] == 0
    assert _context_offsets(features, len(features) - 1)[-1][1] == len(example.context.rstrip())

    gold = [row for row in range(len(features)) if features.start_positions[row] > 0]
    others = [row for row in range(len(features)) if row not in gold]
    assert gold and others
    middle = {row: int(np.flatnonzero(features.offset_mapping.array(row)[:, 0] >= 0)[200]) for row in others}
    peaks = {row: (features.start_positions[row], features.end_positions[row], 10.0) for row in gold}
    peaks.update({row: (middle[row], middle[row], 3.0) for row in others})
    answer = example.answers[0]["text"]
    for n_best in (20, None):
        predictions, null_odds = postprocess([example], features, *_logits(features, peaks), n_best=n_best)
        assert predictions == {example.id: answer} and null_odds == {example.id: 0.0 - 20.0}

    decoy = others[-1]  # the highest-scoring window wins the merge
    offsets = features.offset_mapping[decoy]
    predictions, _ = postprocess([example], features, *_logits(features, {**peaks, decoy: (middle[decoy], middle[decoy], 15.0)}))
    assert predictions[example.id] == example.context[offsets[middle[decoy]][0] : offsets[middle[decoy]][1]] != answer

    # null score = min over windows of the <s> start + end logits, compared with the best span (20)
    high = {row: 12.0 for row in range(len(features))}
    predictions, null_odds = postprocess([example], features, *_logits(features, peaks, high))
    assert predictions[example.id] == "" and null_odds[example.id] == 24.0 - 20.0
    assert postprocess([example], features, *_logits(features, peaks, high), version_2=False)[0][example.id] == answer
    predictions, null_odds = postprocess([example], features, *_logits(features, peaks, {**high, others[0]: 1.0}))
    assert predictions[example.id] == answer and null_odds[example.id] == 2.0 - 20.0


def test_answer_longer_than_any_window_is_counted_and_the_example_kept(tokenizer, long_dev, caplog):
    base = _answerable(long_dev)[3]
    start = base.answers[0]["answer_start"]
    text = base.context[start : base.context.rfind(" ", start, start + 600)].strip()  # ~600 real characters
    example = QAExample("long-answer", base.question, base.context, [{"text": text, "answer_start": start}])
    with caplog.at_level(logging.WARNING, logger="longlm.data.qa"):
        features = featurize([example, base], tokenizer, max_length=192, stride=32, training=False)
    assert features.stats.answers_outside_window == 1 and features.stats.examples == 2
    rows = [row for row in range(len(features)) if features.example_index[row] == 0]
    assert len(rows) > 1 and all(features.start_positions[row] == features.end_positions[row] == 0 for row in rows)
    assert "1 of 2 answerable examples have no window holding a whole answer" in caplog.text
    predictions, null_odds = postprocess([example, base], features, *_logits(features, {}), n_best=None)
    assert set(predictions) == {"long-answer", base.id} and set(null_odds) == set(predictions)


def test_answer_straddling_windows_without_overlap_is_counted(tokenizer, long_dev):
    base = _answerable(long_dev)[4]
    probe = featurize([QAExample("probe", base.question, base.context, [])], tokenizer, max_length=256, stride=0, training=False)
    before, after = _context_offsets(probe, 0), _context_offsets(probe, 1)
    assert before[-1][1] <= after[0][0]  # stride 0: windows do not overlap
    visible_before = [o for o in before if o[1] > o[0]]
    visible_after = [o for o in after if o[1] > o[0]]
    start, end = visible_before[-3][0], visible_after[2][1]
    example = QAExample("straddle", base.question, base.context, [{"text": base.context[start:end], "answer_start": start}])
    assert featurize([example], tokenizer, max_length=256, stride=0).stats.answers_outside_window == 1
    overlapping = featurize([example], tokenizer, max_length=256, stride=32, training=False)
    assert overlapping.stats.answers_outside_window == 0
    row = next(r for r in range(len(overlapping)) if overlapping.start_positions[r] > 0)
    assert _recovered(overlapping, row, base.context) == example.answers[0]["text"]


def test_dataset_items_and_collate(tokenizer, squad_dev):
    examples = squad_dev[:6]
    features = featurize(examples, tokenizer, max_length=384, stride=64)
    assert features.offset_mapping is None  # training features keep no offsets
    items = [features[i] for i in range(3)]
    assert all(value.dtype == torch.long for item in items for value in item.values())
    assert items[0]["input_ids"].tolist() == features.input_ids[0] and items[0]["input_ids"][0] == tokenizer.cls_token_id
    batch = collate(items, tokenizer.pad_token_id, pad_to_multiple_of=8)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == (3, -(-longest // 8) * 8) and batch["start_positions"].shape == (3,)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all() and batch["attention_mask"][row].sum() == n
    impossible = [row for row in range(len(features)) if examples[features.example_index[row]].is_impossible]
    assert impossible and all(features.start_positions[row] == features.end_positions[row] == 0 for row in impossible)


# ------------------------------------------------------------------------------------------------ TriviaQA


def _whole_word_occurrences(alias: str, context: str) -> list[int]:
    """Starts of the case-insensitive occurrences of `alias` with no letter or digit right before or after."""
    found = []
    for match in re.finditer(re.escape(alias), context, re.IGNORECASE):
        before = context[match.start() - 1] if match.start() > 0 else " "
        after = context[match.end()] if match.end() < len(context) else " "
        if not before.isalnum() and not after.isalnum():
            found.append(match.start())
    return found


@pytest.fixture
def triviaqa_files(tmp_path, squad_dev):
    """Official-format and Longformer-style TriviaQA files built from real SQuAD passages: evidence files are
    their contexts, aliases their answers (plus an upper-case variant)."""
    picked, contexts = [], set()
    for example in _answerable(squad_dev):
        answer = example.answers[0]
        if example.context not in contexts and answer["answer_start"] in _whole_word_occurrences(answer["text"], example.context):
            picked.append(example)
            contexts.add(example.context)
        if len(picked) == 4:
            break
    for folder in ("wikipedia", "web"):
        (tmp_path / "evidence" / folder).mkdir(parents=True)
    data = []
    for i, example in enumerate(picked):
        (tmp_path / "evidence" / "wikipedia" / f"{example.id}.txt").write_text(example.context, encoding="utf-8")
        text = example.answers[0]["text"] if i < 3 else picked[0].answers[0]["text"]  # the last one's alias is not in its passage
        pages = [{"Filename": f"{example.id}.txt", "Title": example.id}]
        if i == 1:
            pages.append({"Filename": f"{picked[2].id}.txt", "Title": picked[2].id})  # two pages: one long document
        data.append({
            "QuestionId": example.id, "Question": example.question,
            "Answer": {"Aliases": [text, text.upper()], "NormalizedAliases": [normalize_triviaqa(text)], "Value": text},
            "EntityPages": pages, "SearchResults": [],
        })
    official = tmp_path / "wikipedia-dev.json"
    official.write_text(json.dumps({"Data": data, "Domain": "Wikipedia", "VerifiedEval": False, "Version": 1.0}))
    longformer = {"data": [], "version": 1.0}
    for datum, example in zip(data, picked):  # Longformer's conversion: lower-cased alias, found case-insensitively
        alias = datum["Answer"]["NormalizedAliases"][0]
        answers = [{"text": alias, "answer_start": m.start()} for m in re.finditer(alias, example.context, re.IGNORECASE)]
        longformer["data"].append({"paragraphs": [{"context": example.context, "qas": [{
            "id": f"{example.id}--{example.id}.txt", "qid": example.id, "question": example.question,
            "answers": answers, "aliases": datum["Answer"]["NormalizedAliases"]}]}]})
    (tmp_path / "squad-wikipedia-dev.json").write_text(json.dumps(longformer))
    return picked, official, tmp_path / "squad-wikipedia-dev.json", tmp_path / "evidence"


def test_triviaqa_official_format_reads_evidence_and_finds_alias_occurrences(triviaqa_files, caplog):
    picked, official, _, evidence = triviaqa_files
    with caplog.at_level(logging.WARNING, logger="longlm.data.qa"):
        examples = load_qa_examples(official, evidence_dir=evidence)
    assert [example.id for example in examples] == [example.id for example in picked]
    assert examples[1].context == picked[1].context + "\n\n" + picked[2].context
    for example, source in zip(examples[:3], picked):
        alias = source.answers[0]["text"]
        assert example.question == source.question and not example.is_impossible
        assert example.aliases == [normalize_triviaqa(alias)]
        assert source.answers[0] in example.answers  # the gold occurrence is among the found ones
        assert [a["answer_start"] for a in example.answers] == _whole_word_occurrences(alias, example.context)
        assert all(example.context[a["answer_start"] :].startswith(a["text"]) for a in example.answers)
    assert examples[3].answers == [] and examples[3].aliases and not examples[3].is_impossible
    assert "1 of 4 examples have no alias in their evidence" in caplog.text
    assert load_triviaqa(official, evidence_dir=evidence) == examples


def test_triviaqa_web_domain_is_one_example_per_document(triviaqa_files, tmp_path):
    picked, official, _, evidence = triviaqa_files
    doc = json.loads(official.read_text())
    datum = doc["Data"][0]
    for page in datum["EntityPages"] + [{"Filename": f"{picked[3].id}.txt"}]:
        (evidence / "web" / page["Filename"]).write_text((evidence / "wikipedia" / page["Filename"]).read_text())
    datum["SearchResults"] = [{"Filename": f"{picked[3].id}.txt", "Rank": 0}]
    (tmp_path / "web-dev.json").write_text(json.dumps({**doc, "Data": [datum], "Domain": "Web"}))
    examples = load_triviaqa(tmp_path / "web-dev.json", evidence_dir=evidence)
    assert [e.id for e in examples] == [f"{picked[0].id}--{picked[0].id}.txt", f"{picked[0].id}--{picked[3].id}.txt"]
    assert [e.context for e in examples] == [picked[0].context, picked[3].context]


def test_longformer_squad_style_triviaqa_loads_with_aliases_and_context_case(triviaqa_files):
    picked, official, longformer, evidence = triviaqa_files
    converted = load_qa_examples(longformer)
    direct = load_qa_examples(official, evidence_dir=evidence)
    assert [e.id for e in converted] == [f"{e.id}--{e.id}.txt" for e in picked]
    for example, source, reference in zip(converted, picked, direct):
        assert example.context == source.context and example.aliases == reference.aliases and not example.is_impossible
        for answer in example.answers:  # Longformer stores the lower-cased alias; the text is the context's own
            assert example.context[answer["answer_start"] :].startswith(answer["text"])
    assert source.answers[0] not in converted[3].answers and picked[0].answers[0] in converted[0].answers


# ------------------------------------------------------------------------------------------------ bad input


def _squad_doc(squad_dev, count: int = 3) -> dict:
    """A SQuAD file of the first real questions (a deep copy: tests corrupt it)."""
    return copy.deepcopy({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": e.context, "qas": [{"id": e.id, "question": e.question, "answers": e.answers, "is_impossible": e.is_impossible}]}
        for e in squad_dev[:count]]}]})


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_malformed_json_names_the_file_and_position(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.json' is not valid JSON: .* at line 2, column \d+\.$"):
        load_qa_examples(_write(tmp_path, '{"version": "v2.0",\n "data": [}'))


def test_missing_field_names_the_question(tmp_path, squad_dev):
    doc = _squad_doc(squad_dev)
    del doc["data"][0]["paragraphs"][1]["qas"][0]["question"]
    with pytest.raises(ValueError, match=rf"bad\.json': question '{squad_dev[1].id}' has no 'question' field\.$"):
        load_squad(_write(tmp_path, doc))
    del doc["data"][0]["paragraphs"][1]["context"]
    with pytest.raises(ValueError, match=r"paragraph 1 of article 0 has no 'context' field"):
        load_squad(_write(tmp_path, doc))


def test_answer_start_that_misses_its_text_says_what_the_context_holds(tmp_path, squad_dev):
    doc = _squad_doc(squad_dev)
    qa = doc["data"][0]["paragraphs"][1]["qas"][0]
    answer = qa["answers"][0]
    answer["answer_start"] += 2
    held = squad_dev[1].context[answer["answer_start"] : answer["answer_start"] + len(answer["text"])]
    with pytest.raises(ValueError, match=re.escape(f"question '{qa['id']}' has answer_start {answer['answer_start']} for answer "
                                                   f"{answer['text']!r}, but its context holds {held!r} there.")):
        load_squad(_write(tmp_path, doc))
    answer["answer_start"] = 10**6
    with pytest.raises(ValueError, match=rf"'{qa['id']}' has answer_start 1000000 .* does not fit in its context"):
        load_squad(_write(tmp_path, doc))


def test_contradictions_and_duplicate_ids_are_rejected(tmp_path, squad_dev):
    doc = _squad_doc(squad_dev)
    doc["data"][0]["paragraphs"][1]["qas"][0]["is_impossible"] = True
    with pytest.raises(ValueError, match=rf"question '{squad_dev[1].id}' is marked is_impossible but lists 1 answers"):
        load_squad(_write(tmp_path, doc))
    doc = _squad_doc(squad_dev)
    doc["data"][0]["paragraphs"][2]["qas"][0]["id"] = squad_dev[0].id
    with pytest.raises(ValueError, match=rf"has question id '{squad_dev[0].id}' twice"):
        load_squad(_write(tmp_path, doc))
    with pytest.raises(ValueError, match="QA format must be one of auto, squad, triviaqa, got 'natural'"):
        load_qa_examples(SQUAD2_DEV, format="natural")


def test_slow_tokenizer_is_refused(squad_dev):
    with pytest.raises(ValueError, match=r"^Question answering needs a fast tokenizer .* got ByT5Tokenizer"):
        featurize(squad_dev[:2], ByT5Tokenizer(), max_length=512)


def test_question_that_leaves_no_room_for_context_names_the_question(tokenizer, squad_dev):
    example = squad_dev[1]
    length = len(tokenizer(example.question.lstrip(), add_special_tokens=False)["input_ids"])
    message = rf"^Question '{example.id}' takes {length} tokens plus 4 special tokens, which leaves no room for context"
    with pytest.raises(ValueError, match=message + rf" within max_length={length + 4}\.$"):
        featurize([example], tokenizer, max_length=length + 4)
    message = rf"^Question '{example.id}' .* leaves 10 context tokens per window within max_length={length + 14}"
    with pytest.raises(ValueError, match=message + r", not more than stride=10\.$"):
        featurize([example], tokenizer, max_length=length + 14, stride=10)


def test_triviaqa_without_its_evidence_is_refused(triviaqa_files, tmp_path):
    picked, official, _, evidence = triviaqa_files
    with pytest.raises(ValueError, match=r"wikipedia-dev\.json' names evidence files; pass evidence_dir"):
        load_qa_examples(official)
    (evidence / "wikipedia" / f"{picked[2].id}.txt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"evidence file '.*{picked[2].id}\.txt' of question '{picked[1].id}' does not exist"):
        load_triviaqa(official, evidence_dir=evidence)
    with pytest.raises(ValueError, match=r"official TriviaQA JSON .* use format='triviaqa'"):
        load_qa_examples(official, format="squad")


def test_postprocess_refuses_training_features_and_short_logits(tokenizer, squad_dev):
    training = featurize(squad_dev[:2], tokenizer, max_length=512)
    with pytest.raises(ValueError, match=r"featurize\(\.\.\., training=False\)"):
        postprocess(squad_dev[:2], training, [], [])
    features = featurize(squad_dev[:2], tokenizer, max_length=512, training=False)
    with pytest.raises(ValueError, match=r"got 1 rows of start_logits for 2 features"):
        postprocess(squad_dev[:2], features, [np.zeros(5)], [np.zeros(5)] * 2)
