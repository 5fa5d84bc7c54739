"""Every memory preset walks the user's path on PG-19: pretrain.py -> HF folder -> evaluate.py ->
AutoModelForCausalLM -> generate(). (The enwik8 configs take the same path in each mechanism's tests.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.paths import PG19_SAMPLE, REPO, requires_shared_data

pytestmark = requires_shared_data


def _run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("name", ["transformer-xl", "compressive", "memorizing", "rmt"])
def test_pg19_tiny_config_trains_exports_evaluates_reloads_and_generates(tmp_path, name):
    root = tmp_path / "run"
    _run(
        [
            str(REPO / "scripts" / "pretrain.py"), "fit", "--config", str(REPO / "configs" / "pg19" / f"{name}-tiny.yaml"),
            "--data.path", str(PG19_SAMPLE), "--data.cache_dir", str(tmp_path / "cache"),
            "--data.tokenizer_vocab_size", "1000",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
        ],
        cwd=tmp_path,
    )
    out = _run(
        [
            str(REPO / "scripts" / "evaluate.py"), str(root / "hf"), "--dataset", "pg19", "--path", str(PG19_SAMPLE),
            "--split", "validation", "--tgt-len", "64", "--batch-size", "4", "--max-segments", "3",
            "--cache-dir", str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
    )
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["word_perplexity"] > 1 and metrics["tokens_scored"] == 3 * 4 * 64

    import longlm  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    assert model.config.memory == {"transformer-xl": "xl", "compressive": "compressive", "memorizing": "knn", "rmt": "rmt"}[name]
    prompt = tokenizer("It is a truth universally acknowledged", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert generated.shape == (1, prompt.shape[1] + 6)
    assert generated[0, : prompt.shape[1]].tolist() == prompt[0].tolist()
