"""Lightning training: memory kept across steps, exact resume, export, and the scripts users run."""
from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch

from longlm.training import CausalLMPretraining, LMDataModule, export_checkpoint
from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data

pytestmark = requires_shared_data

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, mem_len=16, hidden_dropout_prob=0.1)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.segments: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.segments.append(int(batch["segment"]))


def _fit(tmp_path, max_steps, *, ckpt_path=None, config=TINY, every=None):
    L.seed_everything(7)
    data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=4, tgt_len=16, eval_batch_size=4, eval_tgt_len=16, cache_dir=str(tmp_path / "cache"))
    module = CausalLMPretraining("transformer-xl", config=config, vocab_size=data.vocab_size, learning_rate=3e-3, warmup_steps=2)
    recorder = LossRecorder()
    callbacks = [recorder]
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True))
    trainer = L.Trainer(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
        gradient_clip_val=0.25,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, recorder


def test_memory_is_carried_between_steps_and_segments_are_consecutive(tmp_path):
    module, recorder = _fit(tmp_path, 3)
    assert recorder.segments == [0, 1, 2]
    assert module.train_memory is not None and module.train_memory.length == 16
    assert not module.train_memory.hidden[0].requires_grad


def test_resume_after_k_steps_gives_the_same_next_loss(tmp_path):
    _, uninterrupted = _fit(tmp_path / "a", 5, every=3)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.exists()
    _, resumed = _fit(tmp_path / "b", 5, ckpt_path=str(ckpt))
    assert resumed.segments == uninterrupted.segments[3:]
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], abs=1e-6)


def test_resume_with_a_different_model_shape_is_refused(tmp_path):
    _fit(tmp_path / "a", 2, every=2)
    wider = {**TINY, "hidden_size": 64}
    with pytest.raises(ValueError, match=r"hidden_size=32 \(now 64\).*cannot change the model.s configuration"):
        _fit(tmp_path / "b", 3, ckpt_path=str(tmp_path / "a" / "ckpt" / "last.ckpt"), config=wider)


def test_export_of_a_checkpoint_reloads_with_identical_logits(tmp_path):
    module, _ = _fit(tmp_path, 2, every=2)
    out = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "hf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The quick brown fox", add_special_tokens=False, return_tensors="pt").input_ids
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, module.model(ids).logits)


def test_export_of_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "hf")


def _pretrain(config: str, data_path, tmp_path, *overrides: str) -> str:
    """`scripts/pretrain.py fit --config configs/<config>` as a user runs it, from `tmp_path`."""
    args = [
        str(REPO / "scripts" / "pretrain.py"), "fit", "--config", str(REPO / "configs" / config),
        "--data.path", str(data_path), "--data.cache_dir", str(tmp_path / "cache"), *overrides,
    ]
    return _run(args, cwd=tmp_path)


def _evaluate(model_dir, dataset: str, data_path, tmp_path, *options: str) -> dict:
    """`scripts/evaluate.py` on the test split; returns the JSON object on its last line."""
    args = [
        str(REPO / "scripts" / "evaluate.py"), str(model_dir), "--dataset", dataset, "--path", str(data_path),
        "--split", "test", "--cache-dir", str(tmp_path / "cache"), *options,
    ]
    return json.loads(_run(args, cwd=tmp_path).strip().splitlines()[-1])


def _run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_cli_fit_then_export_and_evaluate_scripts(tmp_path):
    root = tmp_path / "run"
    _pretrain(
        "enwik8/transformer-xl-tiny.yaml", ENWIK8_SAMPLE, tmp_path,
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(root),
    )
    # the YAML's loggers and checkpoints follow the run's root
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and not (tmp_path / "runs").exists()
    assert (root / "hf" / "config.json").exists() and (root / "hf" / "model.safetensors").exists()
    _run([str(REPO / "scripts" / "export.py"), str(ckpt), str(tmp_path / "exported")], cwd=tmp_path)
    last = _evaluate(
        tmp_path / "exported", "enwik8", ENWIK8_SAMPLE, tmp_path,
        "--tgt-len", "32", "--mem-len", "64", "--batch-size", "16", "--max-segments", "20",
    )
    assert last["mem_len"] == 64 and 0 < last["bits_per_character"] < 9
    assert last["tokens_scored"] == 20 * 16 * 32


def test_evaluate_refuses_a_folder_without_config(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(tmp_path), "--dataset", "enwik8", "--path", str(ENWIK8_SAMPLE)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "has no config.json" in result.stderr.strip().splitlines()[-1]


def test_pg19_tiny_config_trains_and_evaluation_reports_word_perplexity(tmp_path):
    from tests.paths import PG19_SAMPLE

    root = tmp_path / "run"
    _pretrain(
        "pg19/transformer-xl-tiny.yaml", PG19_SAMPLE, tmp_path,
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
    )
    last = _evaluate(root / "hf", "pg19", PG19_SAMPLE, tmp_path, "--tgt-len", "64", "--batch-size", "8", "--max-segments", "5")
    # word-level perplexity is exp(NLL / words) with the word count scaled to the scored part
    assert last["word_perplexity"] > last["token_perplexity"] > 1
    assert last["words"] == len((PG19_SAMPLE / "test" / "2701.txt").read_text(encoding="utf-8", errors="replace").split())


def test_memory_helps_the_trained_tiny_transformer_xl(tmp_path):
    """The Transformer-XL claim, on the acceptance path: the tiny enwik8 config trained briefly scores a
    lower test bpc with its training memory than with --mem-len 0."""
    root = tmp_path / "run"
    _pretrain(
        "enwik8/transformer-xl-tiny.yaml", ENWIK8_SAMPLE, tmp_path,
        "--trainer.max_steps", "500", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
    )
    bpc = {
        mem_len: _evaluate(
            root / "hf", "enwik8", ENWIK8_SAMPLE, tmp_path,
            "--tgt-len", "64", "--mem-len", mem_len, "--batch-size", "16", "--max-segments", "80",
        )["bits_per_character"]
        for mem_len in ("64", "0")
    }
    assert bpc["0"] > bpc["64"] + 0.02, bpc


def test_cli_resumes_with_ckpt_path_last(tmp_path):
    """`pretrain.py fit ... --ckpt_path last` picks up the YAML's checkpoint folder and continues the step count."""
    config = "enwik8/transformer-xl-tiny.yaml"
    _pretrain(config, ENWIK8_SAMPLE, tmp_path, "--trainer.limit_val_batches", "0", "--trainer.max_steps", "4")
    ckpt = tmp_path / "runs" / "enwik8" / "transformer-xl-tiny" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    _pretrain(config, ENWIK8_SAMPLE, tmp_path, "--trainer.limit_val_batches", "0", "--trainer.max_steps", "6", "--ckpt_path", "last")
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 6 and state["longlm"]["next_train_segment"] == 6
