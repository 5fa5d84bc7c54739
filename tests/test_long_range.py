"""The long-context suite end to end at test size, for every preset: training on planted facts, scoring,
held-apart LM, loss by context; the leaderboard's resumability; evaluation memory honoured by every memory."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from longlm import LongLMForCausalLM
from longlm.data.planted import Haystack
from longlm.evaluation.lm import evaluate_stream
from longlm.evaluation.long_range import RetrievalRecipe, answer_loss, reach_in_segments
from longlm.evaluation.loss_by_context import loss_by_context, position_bins, positions_in_document, split_prefix
from longlm.evaluation.suite import SuiteConfig, build_module, run_preset
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, requires_shared_data
from tests.presets_tiny import PRESET_NAMES, SHRINK, SIZE, tiny_preset_config

ROOT = Path(__file__).resolve().parent.parent
PG19, ENWIK8 = str(PG19_SAMPLE), str(ENWIK8_SAMPLE)
pytestmark = requires_shared_data


def tiny_suite(**recipe) -> SuiteConfig:
    return SuiteConfig(
        haystack=[PG19],
        lm_eval={"enwik8": ENWIK8},
        lm_eval_tokens=512,
        context_mem_lens=[0, 16, 64],
        context_tokens=512,
        size=dict(SIZE, hidden_dropout_prob=0.0, attention_dropout=0.0),
        mechanism=SHRINK,
        recipe=RetrievalRecipe(**{**dict(seg_len=32, train_distances=[1.0, 2.0], eval_distances=[1, 2], batch_size=2,
                                         max_steps=4, warmup_steps=1, eval_examples=2), **recipe}),
    )


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_trains_on_planted_facts_and_is_measured(name, tmp_path):
    result = run_preset(name, tiny_suite(), tmp_path, log=lambda line: None)
    assert json.loads((tmp_path / "result.json").read_text())["preset"] == name
    training = result["training"]
    depth = build_module(name, tiny_suite()).segments_per_step  # rmt: one step through 2 segments
    assert training["steps"] == 4 // depth and training["stopped_by"] == "max_steps"
    assert training["tokens"] == 4 * 2 * 32  # the same token budget for every preset
    assert all(math.isfinite(h["lm_bits_per_token"]) for h in training["history"])
    assert [r["distance_segments"] for r in result["retrieval"]] == [1, 2]
    assert all(0.0 <= r["exact_match"] <= 1.0 and r["examples"] == 2 for r in result["retrieval"])
    assert 0 < result["lm"]["enwik8"]["bits_per_byte"] < 12
    sized = name in ("transformer-xl", "compressive", "memorizing")
    assert (result["loss_by_context"] is not None) == sized
    if sized:
        assert [r["mem_len"] for r in result["loss_by_context"]["by_mem_len"]] == [0, 16, 64]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # the scored model, saved
    assert reloaded.config.mixer == result["config"]["mixer"]


def test_the_answer_loss_covers_only_answer_digits():
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 3] = 10.0
    labels = torch.tensor([[0, 3, 5, 0]])
    assert answer_loss(logits, labels, torch.tensor([[False, False, False, False]])) is None
    right = answer_loss(logits, labels, torch.tensor([[False, True, False, False]]))
    both = answer_loss(logits, labels, torch.tensor([[False, True, True, False]]))
    assert right < 1e-3 and both > right


def test_reach_is_the_longest_distance_up_to_which_every_distance_succeeds():
    rows = [{"distance_segments": d, "exact_match": e} for d, e in [(0.5, 1.0), (1, 0.95), (2, 0.5), (4, 0.95)]]
    assert reach_in_segments(rows) == 1
    assert reach_in_segments([{"distance_segments": 0.5, "exact_match": 0.1}]) == 0


def test_the_curriculum_adds_distances_in_equal_stages():
    recipe = RetrievalRecipe(train_distances=[0.5, 1, 2, 4], max_steps=100)
    assert [recipe.stage(s) for s in (0, 24, 25, 50, 75, 99, 100)] == [1, 1, 2, 3, 4, 4, 4]


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("lm_fraction", 1.0), ("train_distances", [])])
def test_a_bad_recipe_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "train_distances" else "train_distances"):
        RetrievalRecipe(**{field: value})


@pytest.mark.parametrize("name", ["transformer-xl", "compressive", "memorizing"])
def test_evaluation_memory_length_is_the_one_asked_for(name):
    """`evaluate_stream(mem_len=M)` changes what every memory sized by mem_len keeps (compressive kept its
    built length before), and gives back the config as it was."""
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config(name, vocab_size=259)).eval()
    split = split_prefix(Haystack(PG19, "test").as_split(), 400)
    seen = []
    original = model.model.memory.update

    def spy(*args, **kwargs):
        state = original(*args, **kwargs)
        seen.append(state.hidden[0].shape[1])
        return state

    model.model.memory.update = spy
    short = evaluate_stream(model, split, tgt_len=32, mem_len=8)["nll"]
    assert max(seen) == 8
    seen.clear()
    long = evaluate_stream(model, split, tgt_len=32, mem_len=96)["nll"]
    assert max(seen) == 96 and short != long
    assert model.config.mem_len == 16


def test_loss_by_context_with_no_memory_equals_every_segment_alone():
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config("transformer-xl", vocab_size=259)).eval()
    split = split_prefix(Haystack(PG19, "test").as_split(), 300)
    result = loss_by_context(model, split, tgt_len=32, mem_lens=[0, 32], max_tokens=None)
    alone = 0.0
    tokens = torch.from_numpy(split.tokens.astype(np.int64))
    with torch.no_grad():
        for begin in range(0, len(tokens) - 1, 32):
            chunk = tokens[begin : begin + 33]
            logits = model(input_ids=chunk[None, :-1]).logits[0]
            alone += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
    rows = {r["mem_len"]: r for r in result["by_mem_len"]}
    assert rows[0]["tokens"] == len(tokens) - 1
    assert rows[0]["bits_per_token"] == pytest.approx(alone / (len(tokens) - 1) / math.log(2), rel=1e-5)
    assert rows[32]["bits_per_token"] != rows[0]["bits_per_token"] and result["sized_by_mem_len"]
    assert sum(r["tokens"] for r in result["by_position"] if r["mem_len"] == 0) == len(tokens) - 1


def test_positions_count_from_each_document_start():
    starts = np.array([0, 5, 12])
    assert positions_in_document(np.array([1, 4, 5, 6, 12, 20]), starts).tolist() == [1, 4, 0, 1, 0, 8]
    assert position_bins(300) == [0, 64, 128, 256, 512]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


TINY_OVERRIDES = [
    "--", "--recipe.max_steps", "3", "--recipe.eval_examples", "2", "--recipe.eval_distances", "[1, 2]",
    "--recipe.batch_size", "2", "--recipe.seg_len", "32", "--recipe.train_distances", "[1.0]", "--lm_eval_tokens", "256",
    "--context_tokens", "256", "--context_mem_lens", "[0, 32]", "--size.num_hidden_layers", "1",
]


NEEDLE_OVERRIDES = [f"--needle-override={o}" for o in (
    "--recipe.lengths=[256, 512]", "--recipe.train_lengths=[256]", "--recipe.train_mix=null", "--recipe.train_examples=4", "--recipe.eval_examples=4",
    "--recipe.tokenizer_vocab_size=300", "--recipe.max_steps=2", "--size.num_hidden_layers=1", "--size.hidden_size=32",
    "--size.intermediate_size=64", "--size.num_attention_heads=2",
    '--variants=[{"name": "full-512", "preset": "full", "max_length": 128, "truncate": true}]',
)]


def test_the_leaderboard_writes_tables_and_plots_and_does_not_retrain_a_finished_preset(tmp_path):
    presets = ["full", "transformer-xl"]
    common = ["scripts/leaderboard.py", "--budget-minutes", "1", "--presets", *presets, "--runs", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results"), "--data", ENWIK8, "--needle-variants", "full-512",
              "--needle-runs", str(tmp_path / "needle"), *NEEDLE_OVERRIDES]
    first = run(*common, *TINY_OVERRIDES)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "| full |" in table and "| transformer-xl |" in table and "chance" in table
    assert "## Needle QA (encoders)" in table and "| full-512 | 128 (truncated) |" in table
    for png in ("leaderboard-retrieval.png", "leaderboard-digits.png", "leaderboard-training.png", "leaderboard-context.png", "leaderboard-needle.png"):
        assert (tmp_path / "results" / png).read_bytes().startswith(b"\x89PNG")
    rows = [json.loads(line) for line in (tmp_path / "results" / "leaderboard.jsonl").read_text().splitlines()]
    assert [r["preset"] for r in rows[:2]] == presets and rows[0]["haystack"] == [ENWIK8]
    assert [r["needle_qa"]["variant"]["name"] for r in rows[2:]] == ["full-512"]
    stamps = {p: (tmp_path / "runs" / p / "result.json").stat().st_mtime_ns for p in presets}
    (tmp_path / "runs" / "transformer-xl" / "result.json").unlink()
    second = run(*common, *TINY_OVERRIDES)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[full] finished before" in second.stderr + second.stdout
    assert (tmp_path / "runs" / "full" / "result.json").stat().st_mtime_ns == stamps["full"]
    assert (tmp_path / "runs" / "transformer-xl" / "result.json").is_file()


def test_long_range_refuses_an_unknown_option_and_an_unknown_preset(tmp_path):
    unknown = run("scripts/long_range.py", "--config", "configs/long_range/tiny.yaml", "--preset", "full",
                  "--output", str(tmp_path), "--recipe.bogus", "3")
    assert unknown.returncode != 0 and "recipe.bogus" in unknown.stderr
    preset = run("scripts/long_range.py", "--config", "configs/long_range/tiny.yaml", "--preset", "nope",
                 "--output", str(tmp_path), "--recipe.max_steps", "1")
    assert preset.returncode != 0 and "nope" in preset.stderr
