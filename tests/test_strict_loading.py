"""longlm's scripts refuse a folder whose weights do not fit its config.json (another preset's weights, more
layers in the config than in the weights), with one sentence naming what is missing or unexpected, instead
of a warning table and a number computed from random weights. For every preset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from longlm import LongLMForCausalLM, LongLMForQuestionAnswering
from longlm.evaluation.lm import load_model_folder
from longlm.evaluation.qa import load_qa_model
from longlm.evaluation.strict_loading import describe_misfit, misfit_from_torch_error
from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data
from tests.presets_tiny import LAYERS, PRESET_NAMES, tiny_preset_config

VOCAB = 259  # ByT5's bytes + specials


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory):
    """QA needs a fast tokenizer: a byte-level BPE trained on a little real text, with the encoder tokens."""
    if not ENWIK8_SAMPLE.exists():
        pytest.skip("../shared/data is not beside the checkout")
    from longlm.data.encoder_tokens import with_encoder_tokens
    from longlm.data.subword import train_bpe

    text = ENWIK8_SAMPLE.read_text(encoding="utf-8", errors="replace")[:200_000]
    tokenizer = with_encoder_tokens(train_bpe([text], VOCAB - 8, tmp_path_factory.mktemp("bpe") / "bpe"))
    return tokenizer


def save_folder(folder: Path, preset: str, model_class=LongLMForCausalLM, tokenizer=None) -> Path:
    torch.manual_seed(0)
    model_class(tiny_preset_config(preset, vocab_size=VOCAB)).save_pretrained(folder)
    (tokenizer or ByT5Tokenizer(extra_ids=0)).save_pretrained(folder)
    return folder


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def add_a_layer(folder: Path) -> None:
    """config.json asks for one layer more than the weights hold (per-layer mixers, if listed, gain one more of the first)."""
    config = json.loads((folder / "config.json").read_text())
    layers = {"num_hidden_layers": config["num_hidden_layers"] + 1}
    if config.get("layer_mixers"):
        layers["layer_mixers"] = [*config["layer_mixers"], config["layer_mixers"][0]]
    edit_config(folder, **layers)


def other_preset(name: str) -> str:
    """A preset whose parameters differ from `name`'s (so its weights cannot fit `name`'s config)."""
    names = {n: set(LongLMForCausalLM(tiny_preset_config(n, vocab_size=VOCAB)).state_dict()) for n in PRESET_NAMES}
    return next(n for n in PRESET_NAMES if names[n] != names[name])


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_a_folder_that_fits_loads_with_its_weights(preset, tmp_path):
    folder = save_folder(tmp_path / "ok", preset)
    model, _ = load_model_folder(folder)
    saved = LongLMForCausalLM.from_pretrained(folder).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_more_layers_in_config_than_in_the_weights_is_refused(preset, tmp_path):
    folder = save_folder(tmp_path / "deeper", preset)
    add_a_layer(folder)
    with pytest.raises(ValueError, match=rf"do not fit its config\.json \(missing model\.layers\.{LAYERS}\.") as error:
        load_model_folder(folder)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_another_presets_weights_are_refused(preset, tmp_path):
    folder = save_folder(tmp_path / "mine", preset)
    donor = save_folder(tmp_path / "donor", other_preset(preset))
    (folder / "model.safetensors").write_bytes((donor / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"do not fit its config\.json \((missing|unexpected|wrong shape) ") as error:
        load_model_folder(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_question_answering_may_start_only_the_span_head_fresh(preset, tmp_path, fast_tokenizer):
    """A pretrained LM folder loads for QA (its span head is new); a QA fine-tune without its span head,
    or with a layer missing, is refused."""
    lm = save_folder(tmp_path / "lm", preset, tokenizer=fast_tokenizer)
    model, _ = load_qa_model(lm)
    assert isinstance(model, LongLMForQuestionAnswering)

    fine_tuned = save_folder(tmp_path / "qa", preset, LongLMForQuestionAnswering, tokenizer=fast_tokenizer)
    load_qa_model(fine_tuned)
    from safetensors.torch import load_file, save_file

    weights = load_file(fine_tuned / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("qa_outputs.")}, fine_tuned / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fit its config\.json \(missing qa_outputs\.bias, qa_outputs\.weight\)"):
        load_qa_model(fine_tuned)

    add_a_layer(lm)
    with pytest.raises(ValueError, match=rf"missing model\.layers\.{LAYERS}\."):
        load_qa_model(lm)


def test_torch_strict_load_errors_become_the_same_report():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3))
    state = {"0.weight": torch.zeros(4, 2), "1.bias": torch.zeros(3)}
    with pytest.raises(RuntimeError) as error:
        module.load_state_dict(state)
    parts = describe_misfit(misfit_from_torch_error(str(error.value)))
    assert parts == ["missing 0.bias", "unexpected 1.bias", "wrong shape 0.weight ((4, 2) in the file, (3, 2) for config.json)"]


@requires_shared_data
def test_evaluate_script_refuses_a_misfit_folder_before_computing_anything(tmp_path):
    folder = save_folder(tmp_path / "deeper", "transformer-xl")
    edit_config(folder, num_hidden_layers=LAYERS + 1)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(folder), "--dataset", "enwik8", "--path",
         str(ENWIK8_SAMPLE), "--tgt-len", "16", "--max-segments", "2", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "bits_per_character" not in result.stdout
    assert f"missing model.layers.{LAYERS}." in result.stderr.strip().splitlines()[-1]


@requires_shared_data
@pytest.mark.parametrize("script", ["evaluate_qa", "finetune_qa"])
def test_qa_scripts_refuse_a_misfit_folder_before_computing_anything(script, tmp_path, fast_tokenizer):
    """Through the scripts users run: `evaluate_qa.py DIR` and `finetune_qa.py fit --model.pretrained DIR`."""
    from tests.paths import SQUAD2_DEV

    folder = save_folder(tmp_path / "deeper", "longformer", tokenizer=fast_tokenizer)
    edit_config(folder, num_hidden_layers=LAYERS + 1)
    if script == "evaluate_qa":
        args = [str(folder), "--data", str(SQUAD2_DEV), "--max-examples", "2", "--max-length", "256"]
    else:
        args = ["fit", "--config", str(REPO / "configs" / "qa" / "squad2-tiny.yaml"), "--model.pretrained", str(folder),
                "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "exact_match" not in result.stdout and not (tmp_path / "run" / "checkpoints").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert "do not fit its config.json" in last and f"missing model.layers.{LAYERS}." in last
