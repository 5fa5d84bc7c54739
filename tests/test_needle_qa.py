"""Needle QA: the generator's files, scoring by needle position, global attention switched off, truncation,
and every variant fine-tuned and scored end to end through scripts/finetune_qa.py (resumable)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlm.data.planted import Haystack
from longlm.data.qa import QAExample, featurize, load_qa_examples
from longlm.evaluation.needle_qa import (
    NeedleRecipe, NeedleSuite, NeedleVariant, default_variants, haystack_tokenizer, initial_folder, needle_positions,
    parse_needle, run_needle, scores_by_position, write_needle_files,
)
from longlm.evaluation.qa import load_qa_model
from tests.paths import PG19_SAMPLE, requires_shared_data

ROOT = Path(__file__).resolve().parent.parent
pytestmark = requires_shared_data
SIZE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
            attention_dropout=0.0, max_position_embeddings=1024)
MECHANISM = dict(attention_window=16, block_size=16, num_random_blocks=1)


def tiny_recipe(**overrides) -> NeedleRecipe:
    fields = dict(lengths=[256, 512], train_lengths=[256], train_examples=6, eval_examples=6, tokenizer_vocab_size=512,
                  max_steps=2, warmup_steps=1, num_distractors=2)
    return NeedleRecipe(**{**fields, **overrides})


@pytest.fixture(scope="module")
def needle_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("needle")
    train, test = Haystack(str(PG19_SAMPLE), "train"), Haystack(str(PG19_SAMPLE), "test")
    tokenizer = haystack_tokenizer(train, 512, folder / "tokenizer")
    files = write_needle_files(tiny_recipe(), train, test, tokenizer, folder / "data")
    return folder, tokenizer, files


def test_needle_files_are_squad_v2_with_positions_and_distractors(needle_files):
    _, tokenizer, files = needle_files
    assert tokenizer.is_fast and tokenizer.sep_token_id is not None
    train = load_qa_examples(files["train"])
    assert len(train) == 6
    for length, path in files["test"].items():
        examples = load_qa_examples(path)
        positions = needle_positions(path)
        assert len(examples) == 6 and set(positions) == {e.id for e in examples}
        assert any(e.is_impossible for e in examples) or length == 512  # a share of questions has no answer
        for example in examples:
            assert (positions[example.id] is None) == example.is_impossible
            assert example.context.count("The key of ") == 3  # the needle (or its stand-in) and two distractors
        tokens = [len(tokenizer(e.context, add_special_tokens=False)["input_ids"]) for e in examples]
        assert 0.9 * length < sum(tokens) / len(tokens) < 1.1 * length  # sized in tokens, not bytes


def test_scores_by_position_give_an_oracle_100_and_a_wrong_answer_0(needle_files):
    _, _, files = needle_files
    path = files["test"][256]
    examples = load_qa_examples(path)
    positions = needle_positions(path)
    buckets = tiny_recipe().positions
    oracle = {e.id: (e.answers[0]["text"] if e.answers else "") for e in examples}
    rows = scores_by_position(examples, oracle, positions, buckets)
    assert rows and all(r["exact"] == 100.0 and r["f1"] == 100.0 for r in rows)
    assert sum(r["examples"] for r in rows) == sum(not e.is_impossible for e in examples)
    wrong = scores_by_position(examples, {e.id: "00000 11111" for e in examples}, positions, buckets)
    assert all(r["exact"] == 0.0 and r["f1"] == 0.0 for r in wrong)


def test_window_only_attention_cannot_see_the_question_beyond_its_window(needle_files, tmp_path):
    """Global attention on: the question reaches every token. Off: only tokens within layers x window/2 of it."""
    _, tokenizer, _ = needle_files
    folder = initial_folder(NeedleVariant("lf", "longformer"), SIZE, MECHANISM, tokenizer, tmp_path / "init", seed=0)
    context = "It was a long and quiet evening by the river, and nobody spoke of the key at all. " * 12
    questions = ["What is the key of Alice?", "What is the key of Bram?"]
    logits = {}
    for flag in (True, False):
        model, qa_tokenizer = load_qa_model(folder, question_global_attention=flag)
        batch = qa_tokenizer(questions, [context, context], return_tensors="pt")
        with torch.no_grad():
            out = model(**batch)
        assert bool(out.global_attention_mask.any()) == flag
        logits[flag] = out.start_logits
    reach = SIZE["num_hidden_layers"] * MECHANISM["attention_window"] // 2
    far = slice(40 + reach, batch["input_ids"].shape[1])  # well past the question and any token that can see it
    assert not torch.allclose(logits[True][0, far], logits[True][1, far])
    torch.testing.assert_close(logits[False][0, far], logits[False][1, far], rtol=0, atol=1e-6)


def test_truncation_keeps_only_the_first_window(needle_files):
    _, tokenizer, files = needle_files
    examples = load_qa_examples(files["test"][512])
    strided = featurize(examples, tokenizer, max_length=128, stride=32, training=False)
    truncated = featurize(examples, tokenizer, max_length=128, stride=32, training=False, truncate=True)
    assert len(strided) > len(examples) and len(truncated) == len(examples)
    assert truncated.stats.answers_outside_window >= strided.stats.answers_outside_window
    assert all(len(truncated[i]["input_ids"]) <= 128 for i in range(len(truncated)))


def test_every_variant_is_fine_tuned_and_scored_and_a_rerun_retrains_nothing(tmp_path):
    suite = NeedleSuite(haystack=[str(PG19_SAMPLE)], size=SIZE, mechanism=MECHANISM, recipe=tiny_recipe(),
                        variants=[NeedleVariant(v.name, v.preset, v.question_global_attention,
                                                128 if v.max_length else None, v.truncate) for v in default_variants()])
    results = run_needle(suite, tmp_path, log=lambda line: None)
    assert [r["variant"]["name"] for r in results] == ["longformer", "longformer-window-only", "bigbird", "full-512"]
    for result in results:
        assert result["train_steps"] == 2 and result["stopped_by"] == "max_steps"
        assert [s["length"] for s in result["scores"]] == [256, 512]
        for score in result["scores"]:
            assert 0.0 <= score["f1"] <= 100.0 and score["total"] == 6 and score["by_position"]
        saved = json.loads((Path(result["folder"]) / "config.json").read_text())
        assert saved["architectures"] == ["LongLMForQuestionAnswering"] and saved["is_decoder"] is False
    assert results[1]["variant"]["question_global_attention"] is False
    assert json.loads((Path(results[1]["folder"]) / "config.json").read_text())["question_global_attention"] is False
    assert results[3]["scores"][1]["features"]["features"] == 6  # truncated: one window per document
    stamps = {r["variant"]["name"]: (tmp_path / r["variant"]["name"] / "needle_result.json").stat().st_mtime_ns for r in results}
    again = run_needle(suite, tmp_path, log=lambda line: None)
    assert again == results
    assert stamps == {r["variant"]["name"]: (tmp_path / r["variant"]["name"] / "needle_result.json").stat().st_mtime_ns for r in again}


def test_the_needle_config_parses_and_refuses_unknown_keys():
    _, suite = parse_needle(["--config", str(ROOT / "configs" / "needle_qa" / "tiny.yaml")])
    assert [v.name for v in suite.variants] == ["longformer", "longformer-window-only", "bigbird", "full-512"]
    assert suite.recipe.lengths == [1024, 4096, 16384]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "needle_qa.py"), "--config",
                             str(ROOT / "configs" / "needle_qa" / "tiny.yaml"), "--recipe.max_stepz", "3"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "max_stepz" in result.stderr
    with pytest.raises(ValueError, match="NeedleRecipe.lengths"):
        NeedleRecipe(lengths=[12])
    with pytest.raises(ValueError, match="not in the suite"):
        suite.variant("nope")
