"""The planted-fact generators: the answer is where the labels say, and the scorer gives a model that copies
the answer from its context 1.0 and a random one chance."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from longlm.data.planted import (
    FACT, NAMES, QUERY, Haystack, PlantedStreams, example_segments, needle_qa_examples, plain_document, retrieval_example, to_ids, to_text,
)
from longlm.evaluation.long_range import RetrievalRecipe, retrieval_accuracy
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, requires_shared_data

PG19, ENWIK8 = PG19_SAMPLE, ENWIK8_SAMPLE
pytestmark = requires_shared_data


@pytest.fixture(scope="module")
def haystack() -> Haystack:
    return Haystack(PG19, "test")


@pytest.mark.parametrize("num_facts", [1, 3])
@pytest.mark.parametrize("distance", [0.5, 1, 2, 4, 8])
def test_the_planted_answer_is_where_the_labels_say(haystack, distance, num_facts):
    rng = np.random.default_rng(7)
    for _ in range(5):
        example = retrieval_example(haystack, rng, seg_len=64, distance=distance, num_facts=num_facts)
        assert len(example.ids) % 64 == 0
        assert example.distance == round(distance * 64)
        text = to_text(example.ids)
        key = example.key
        assert to_text(example.ids[example.answer_mask]) == key and example.answer_mask.sum() == 5
        assert to_text(example.ids[example.key_at : example.key_at + 5]) == key
        name = re.search(r"The key of (\w+) is $", text[: example.answer_at]).group(1)
        assert text[: example.answer_at].endswith(QUERY.format(name=name))
        assert text.endswith(QUERY.format(name=name) + key + ". ")
        assert text.count(FACT.format(name=name, key=key)) == 2  # planted once, recalled once (the query and its answer)
        planted = re.findall(r"The key of (\w+) is (\d{5})\. ", text)
        assert len(planted) == num_facts + 1  # every fact plus the query's completion
        assert len({n for n, _ in planted}) == num_facts and all(n in NAMES for n, _ in planted)


def test_a_distance_too_short_for_the_query_is_refused(haystack):
    with pytest.raises(ValueError, match="distance 0.25 x seg_len 64 = 16 tokens"):
        retrieval_example(haystack, np.random.default_rng(0), seg_len=64, distance=0.25)


def test_streams_align_answers_with_labels_and_mark_every_document_start(haystack):
    draws = []

    def draw(rng):
        example = retrieval_example(haystack, rng, seg_len=64, distance=float(rng.choice([0.5, 1, 2])))
        draws.append(example)
        return example if len(draws) % 3 else plain_document(haystack, rng, 128)

    streams = PlantedStreams(draw, rows=2, seg_len=64, seed=3)
    keys = {0: [], 1: []}
    starts = {0: 0, 1: 0}
    for index in range(20):
        batch = streams.next_segment()
        assert batch["segment"] == index
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for row in range(2):
            keys[row].append(to_text(batch["labels"][row][batch["answer_mask"][row]].numpy()))
            starts[row] += int(batch["document_starts"][row].sum())
            assert not batch["document_starts"][row, 1:].any()  # documents are whole segments: starts sit at column 0
            assert bool(batch["new_document"][row]) == bool(batch["document_starts"][row, 0]) or index == 0
    answers = "".join(keys[0] + keys[1])
    planted = "".join(e.key for e in draws if e.num_facts)
    assert answers and set(answers) <= set("0123456789") and len(answers) % 5 == 0
    assert all(key in planted for key in re.findall(r"\d{5}", answers))
    assert starts[0] >= 5 and starts[1] >= 5


class CopyingOracle(torch.nn.Module):
    """Predicts each answer digit by finding the queried name's fact earlier in the document (its memory is the
    document read so far): the upper bound any model can reach on the task."""

    class Memory:
        def __init__(self, texts: list[str]) -> None:
            self.texts = texts

        def reset_rows(self, rows):
            return CopyingOracle.Memory(["" if r else t for t, r in zip(self.texts, rows.tolist())])

    def forward(self, input_ids, memory=None, document_starts=None):
        from types import SimpleNamespace

        rows, width = input_ids.shape
        before = memory.texts if memory is not None else [""] * rows
        logits = torch.zeros(rows, width, 259)
        texts = []
        for row in range(rows):
            text = before[row] + to_text(input_ids[row].numpy())
            offset = len(before[row])
            facts: dict[str, str] = {}
            for match in re.finditer(r"The key of (\w+) is (\d{5})", text):
                facts.setdefault(match.group(1), match.group(2))
            for match in re.finditer(r"The key of (\w+) is ", text):
                name, end = match.group(1), match.end()
                if name in facts and text[end : end + 5] != facts[name] or end - 1 < offset:
                    continue
                for k in range(5):
                    position = end - 1 + k - offset
                    if 0 <= position < width and match.start() != text.find(f"The key of {name} is "):
                        logits[row, position, int(to_ids(facts[name][k])[0])] = 1.0
            texts.append(text)
        return SimpleNamespace(logits=logits, memory=CopyingOracle.Memory(texts))


class RandomPredictor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, input_ids, memory=None, document_starts=None):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, 259)
        digits = torch.randint(0, 10, input_ids.shape, generator=self.generator) + int(to_ids("0")[0])
        logits.scatter_(-1, digits[..., None], 1.0)
        return SimpleNamespace(logits=logits, memory=None)


def test_a_model_that_copies_from_its_context_scores_one_and_a_random_one_chance(haystack):
    recipe = RetrievalRecipe(eval_distances=[0.5, 1, 4], eval_examples=64, num_facts=3)
    oracle = retrieval_accuracy(CopyingOracle(), haystack, recipe)
    assert [row["exact_match"] for row in oracle] == [1.0, 1.0, 1.0]
    random = retrieval_accuracy(RandomPredictor(), haystack, recipe)
    digit = np.mean([row["digit_accuracy"] for row in random])
    assert abs(digit - 0.1) < 0.03, digit  # 960 digits: chance 0.1 +- 3 standard errors
    assert all(row["exact_match"] <= 1 / 64 for row in random)
    assert random[0]["chance_exact_match"] == 1e-5 and random[0]["chance_digit_accuracy"] == 0.1


def test_scoring_examples_are_the_same_for_every_model_and_segmented_like_training(haystack):
    recipe = RetrievalRecipe(eval_distances=[2], eval_examples=4)
    rng = np.random.default_rng(0)
    examples = [retrieval_example(haystack, rng, seg_len=64, distance=2) for _ in range(4)]
    segments = example_segments(examples, 64)
    assert len(segments) == len(examples[0].ids) // 64
    assert segments[0]["document_starts"][:, 0].all() and not any(s["document_starts"].any() for s in segments[1:])
    answers = torch.cat([s["labels"][s["answer_mask"]].view(4, -1) for s in segments if s["answer_mask"].any()], dim=1)
    assert [to_text(a.numpy()) for a in answers] == [e.key for e in examples]
    assert retrieval_accuracy(RandomPredictor(), haystack, recipe) == retrieval_accuracy(RandomPredictor(), haystack, recipe)


@pytest.mark.parametrize("source", [PG19, ENWIK8], ids=["pg19-folder", "text-file"])
def test_a_haystack_is_any_text_file_or_pg19_folder(source):
    train, test = Haystack(source, "train"), Haystack(source, "test")
    assert sum(map(len, train.texts)) > sum(map(len, test.texts)) > 4096
    split = test.as_split()
    assert len(split.tokens) == sum(map(len, test.texts)) and split.num_words > 0
    assert train.texts[0][1000:1200] not in b"".join(test.texts)  # held apart


def test_a_haystack_that_is_missing_or_too_short_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="Haystack path .* does not exist"):
        Haystack(tmp_path / "nothing.txt")
    short = tmp_path / "short.txt"
    short.write_text("too short " * 100)
    with pytest.raises(ValueError, match="less than 4,096 bytes"):
        Haystack(short, "test")


def test_needle_qa_puts_the_answer_where_the_labels_say(haystack):
    data = needle_qa_examples(haystack, num_examples=40, context_bytes=1024, seed=0, positions=[0.1, 0.5, 0.9])
    qas = [(p["context"], p["qas"][0]) for p in data["data"][0]["paragraphs"]]
    answerable = [(c, q) for c, q in qas if not q["is_impossible"]]
    assert 0 < len(answerable) < len(qas)
    for context, qa in qas:
        name = re.match(r"What is the key of (\w+)\?", qa["question"]).group(1)
        assert abs(len(context.encode()) - 1024) < 8
        if qa["is_impossible"]:
            assert f"The key of {name} is" not in context and qa["answers"] == [] and re.search(r"The key of \w+ is \d{5}\.", context)
        else:
            answer = qa["answers"][0]
            assert context[answer["answer_start"] : answer["answer_start"] + 5] == answer["text"]
            assert context[: answer["answer_start"]].endswith(f"The key of {name} is ")
    positions = sorted({round(q["needle_position"], 1) for _, q in answerable})
    assert positions[0] <= 0.15 and positions[-1] >= 0.85


def test_needle_qa_distractors_name_other_people_and_leave_the_answer_in_place(haystack):
    data = needle_qa_examples(haystack, num_examples=30, context_bytes=2048, seed=3, num_distractors=3)
    for paragraph in data["data"][0]["paragraphs"]:
        context, qa = paragraph["context"], paragraph["qas"][0]
        name = re.match(r"What is the key of (\w+)\?", qa["question"]).group(1)
        facts = re.findall(r"The key of (\w+) is (\d{5})\. ", context)
        assert len(facts) == 4 and len({n for n, _ in facts}) == 4
        assert sum(n == name for n, _ in facts) == (0 if qa["is_impossible"] else 1)
        if not qa["is_impossible"]:
            answer = qa["answers"][0]
            assert (name, answer["text"]) in facts
            assert context[answer["answer_start"] : answer["answer_start"] + 5] == answer["text"]
            assert context[: answer["answer_start"]].endswith(f"The key of {name} is ")
    with pytest.raises(ValueError, match="num_distractors"):
        needle_qa_examples(haystack, num_examples=1, context_bytes=1024, seed=0, num_distractors=len(NAMES))
