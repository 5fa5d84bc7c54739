"""Every sparse-attention preset walks the user's path on the enwik8 sample: pretrain.py with its tiny
config -> HF folder -> evaluate.py -> AutoModel / AutoModelForCausalLM -> generate(), and the folder loads as
remote code where longlm cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data
from tests.remote_code_check import run_remote

pytestmark = requires_shared_data

MIXER_OF = {"longformer": "sliding", "bigbird": "block_sparse", "reformer": "lsh", "routing": "routing"}


def _run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("name", sorted(MIXER_OF))
def test_enwik8_tiny_config_trains_exports_evaluates_reloads_and_generates(tmp_path, name):
    root = tmp_path / "run"
    _run(
        [
            str(REPO / "scripts" / "pretrain.py"), "fit", "--config", str(REPO / "configs" / "enwik8" / f"{name}-tiny.yaml"),
            "--data.path", str(ENWIK8_SAMPLE), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
        ],
        cwd=tmp_path,
    )
    out = _run(
        [
            str(REPO / "scripts" / "evaluate.py"), str(root / "hf"), "--dataset", "enwik8", "--path", str(ENWIK8_SAMPLE),
            "--split", "validation", "--tgt-len", "300", "--batch-size", "2", "--max-segments", "2",
            "--cache-dir", str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
    )
    metrics = json.loads(out.strip().splitlines()[-1])
    assert 0 < metrics["bits_per_character"] < 9 and metrics["tokens_scored"] == 2 * 2 * 300

    import longlm  # noqa: F401
    from transformers import AutoModel, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    assert MIXER_OF[name] in model.config.mixers
    ids = torch.randint(3, 259, (1, 300))
    with torch.no_grad():
        base = AutoModel.from_pretrained(root / "hf").eval()(ids, global_attention_mask=(torch.arange(300) % 97 == 0)[None].long())
        assert base.last_hidden_state.shape == (1, 300, model.config.hidden_size)
        generated = model.generate(ids[:, :20], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 25) and generated[0, :20].tolist() == ids[0, :20].tolist()
    # generation reproduces the training-time forward: greedy tokens are the argmax of one full forward
    with torch.no_grad():
        logits = model(generated).logits
    assert generated[0, 20:].tolist() == logits[0, 19:24].argmax(-1).tolist()

    remote = run_remote(root / "hf", [ids[:, :120]], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"][0], model(ids[:, :120]).logits, rtol=1e-5, atol=1e-5)
