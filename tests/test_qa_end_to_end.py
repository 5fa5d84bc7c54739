"""finetune_qa.py -> exported folder -> evaluate_qa.py, on real SQuAD v2 slices, as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from longlm import LongLMConfig, LongLMForMaskedLM
from longlm.data.encoder_tokens import with_encoder_tokens
from longlm.data.qa import load_squad
from longlm.data.subword import train_bpe
from tests.paths import PG19_SAMPLE, REPO, SQUAD2_DEV, SQUAD2_TRAIN, requires_qa_data, requires_shared_data

pytestmark = [requires_shared_data, requires_qa_data]


def _run(*args: str, cwd) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A tiny longformer-preset masked LM with a real PG-19 BPE: what pretrain.py's MLM task exports."""
    folder = tmp_path_factory.mktemp("mlm")
    books = sorted((PG19_SAMPLE / "train").glob("*.txt"))
    bpe = train_bpe([b.read_text(encoding="utf-8", errors="replace")[:200_000] for b in books], 600, folder / "bpe")
    tokenizer = with_encoder_tokens(bpe)
    config = LongLMConfig.from_preset(
        "longformer", num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(tokenizer), is_decoder=False, attention_window=32, hidden_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    LongLMForMaskedLM(config).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return folder / "hf"


def test_finetune_then_evaluate(encoder_folder, tmp_path):
    root = tmp_path / "run"
    _run(
        "scripts/finetune_qa.py", "fit", "--config", "configs/qa/squad2-tiny.yaml",
        f"--model.pretrained={encoder_folder}", f"--data.train_file={SQUAD2_TRAIN}", f"--data.validation_file={SQUAD2_DEV}",
        "--data.max_train_examples=48", "--data.max_eval_examples=24", "--data.batch_size=8", "--data.max_length=256",
        "--data.stride=64", "--trainer.max_epochs=1", "--trainer.max_steps=4", f"--trainer.default_root_dir={root}",
        "--trainer.logger=false", '--trainer.callbacks=[{"class_path": "longlm.training.ExportHuggingFace"}]',
        "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        cwd=REPO,
    )
    exported = root / "hf"
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LongLMForQuestionAnswering"]
    assert config["auto_map"]["AutoModelForQuestionAnswering"].endswith("LongLMForQuestionAnswering")

    out = _run(
        "scripts/evaluate_qa.py", str(exported), "--data", str(SQUAD2_DEV), "--max-length", "256", "--stride", "64",
        "--max-examples", "24", "--output-dir", str(tmp_path / "preds"), cwd=REPO,
    )
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert key in result
    assert result["total"] == 24 and result["features"]["examples"] == 24
    predictions = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    examples = load_squad(SQUAD2_DEV)[:24]
    assert set(predictions) == {e.id for e in examples}
    for example in examples:  # the official format: an id -> a span of its context, or "" for no answer
        assert predictions[example.id] == "" or predictions[example.id] in example.context
    null_odds = json.loads((tmp_path / "preds" / "null_odds.json").read_text())
    assert set(null_odds) == set(predictions)
