"""`longlm.convert_hf` / `scripts/convert_hf.py`: tiny randomly initialised transformers Longformer and BigBird
folders, converted, give HF's hidden states and MLM logits (eval mode), load in every longlm head and keep
their tokenizer. BigBird at block-sparse lengths: HF's eval mode uses no random blocks
(tests/test_block_sparse.py::test_hugging_face_eval_mode_has_no_random_plan), so HF runs in training mode with
dropout 0, its per-layer random plans are recorded and handed to our mixers' plan cache."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BigBirdConfig,
    BigBirdForMaskedLM,
    BigBirdModel,
    BigBirdTokenizer,
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerModel,
    LongformerTokenizer,
)

import longlm  # noqa: F401  (registers the Auto classes)
from longlm.convert_hf import TOKENIZER_FILES, convert_hf_folder
from tests.paths import PG19_SAMPLE, REPO, SHARED_DATA

SPM_MODEL = SHARED_DATA / "tokenizers" / "botchan_en_unigram_1000.model"
requires_tokenizer_data = pytest.mark.skipif(
    not SPM_MODEL.exists() or not PG19_SAMPLE.exists(), reason="../shared/data is not beside the checkout"
)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
LONGFORMER_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # HF's Longformer softmax runs in float32
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, type_vocab_size=2,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
LONGFORMER = dict(TINY, vocab_size=120, attention_window=[4, 8], max_position_embeddings=66)
BIGBIRD = dict(TINY, vocab_size=120, block_size=2, num_random_blocks=1, max_position_embeddings=64)
SPARSE_LENGTH, SHORT_LENGTH = 19, 11  # BigBird (b=2, r=1) uses full attention up to (5 + 2r) b = 14 tokens


def _save_perturbed(model: torch.nn.Module, folder: Path, tokenizer=None) -> Path:
    """Save after moving every parameter off its initial value (zero biases, unit norms would hide mix-ups)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _pg19_text(chars: int) -> str:
    return (PG19_SAMPLE / "train" / "105.txt").read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A RoBERTa-style byte-level BPE (what Longformer uses), trained on PG-19 sample text."""
    if not PG19_SAMPLE.exists():
        pytest.skip("../shared/data is not beside the checkout")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([_pg19_text(200_000)], trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    return LongformerTokenizer(vocab=trained["vocab"], merges=[tuple(pair) for pair in trained["merges"]])


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """BigBird's SentencePiece tokenizer over a real unigram model."""
    if not SPM_MODEL.exists():
        pytest.skip("../shared/data is not beside the checkout")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "spiece.model").write_bytes(SPM_MODEL.read_bytes())
    return BigBirdTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def longformer_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("longformer")
    src = _save_perturbed(LongformerModel(LongformerConfig(**LONGFORMER)), root / "hf")
    return src, convert_hf_folder(src, root / "longlm")


@pytest.fixture(scope="module", params=[(True, False), (False, True)], ids=["bias", "no-bias-rescaled"])
def bigbird_folders(request, tmp_path_factory) -> tuple[Path, Path]:
    use_bias, rescale = request.param
    root = tmp_path_factory.mktemp("bigbird")
    config = BigBirdConfig(**BIGBIRD, use_bias=use_bias, rescale_embeddings=rescale)
    src = _save_perturbed(BigBirdModel(config), root / "hf")
    return src, convert_hf_folder(src, root / "longlm")


@pytest.fixture(scope="module")
def mlm_folders(tmp_path_factory, bpe_tokenizer, spm_tokenizer) -> dict[str, tuple[Path, Path, object]]:
    """Masked-LM models whose config takes its vocabulary and special ids from a real tokenizer."""
    folders = {}
    for name, hf_class, config_class, fields, tokenizer in (
        ("longformer", LongformerForMaskedLM, LongformerConfig, LONGFORMER, bpe_tokenizer),
        ("big_bird", BigBirdForMaskedLM, BigBirdConfig, BIGBIRD, spm_tokenizer),
    ):
        ids = dict(
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, sep_token_id=tokenizer.sep_token_id,
        )
        config = config_class(**{**fields, "vocab_size": len(tokenizer), **ids})
        root = tmp_path_factory.mktemp(name)
        src = _save_perturbed(hf_class(config), root / "hf", tokenizer)
        folders[name] = (src, convert_hf_folder(src, root / "longlm"), tokenizer)
    return folders


def _batch(vocab: int, length: int, pad_id: int, padded: int = 0, seed: int = 0):
    """Two rows of real (non-special) ids and token types; the second row ends in `padded` pad tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        ids[1, -padded:], mask[1, -padded:] = pad_id, 0
    types = torch.randint(0, 2, (2, length), generator=generator)
    return ids, mask, types


def _max_diff(hf_out: torch.Tensor, ours_out: torch.Tensor, mask: torch.Tensor) -> float:
    """HF's outputs for padding tokens are not ours (and not meaningful): compare the real tokens."""
    return (hf_out[mask.bool()] - ours_out[mask.bool()]).abs().max().item()


def _bigbird_forward_with_plans(hf_backbone: BigBirdModel, run):
    """Run HF in training mode (dropout 0: only its random plan changes), recording each layer's plan."""
    hf_backbone.set_attention_type("block_sparse")  # HF stays in full attention after any short input
    plans: list[np.ndarray] = []
    for layer in hf_backbone.encoder.layer:
        attention = layer.attention.self
        draw = attention._bigbird_block_rand_mask_with_head

        def record(*args, draw=draw, **kwargs):
            plans.append(np.stack(draw(*args, **kwargs)))  # (H, n - 2, r)
            return list(plans[-1])

        attention._bigbird_block_rand_mask_with_head = record
    hf_backbone.train()
    try:
        with torch.no_grad():
            return run(), plans
    finally:
        hf_backbone.eval()


def _hand_plans(ours_backbone, plans: list[np.ndarray], length: int, block_size: int) -> None:
    """Put HF's per-layer plan where our block_sparse mixer looks first (its plan cache)."""
    n = -(-length // block_size)
    for layer, hf_plan in zip(ours_backbone.layers, plans):
        plan = torch.full((hf_plan.shape[0], n, hf_plan.shape[2]), -1, dtype=torch.long)
        plan[:, 1 : n - 1] = torch.as_tensor(hf_plan, dtype=torch.long)
        assert (plan[:, 1 : n - 1] > 0).all()  # a real plan: no slot points back at global block 0
        layer.block.mixer._plans[(n, False, torch.device("cpu"))] = plan


# --------------------------------------------------------------------------------------------------
# parity of the backbones
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_longformer_hidden_states_equal_hugging_face(longformer_folders, dtype):
    src, dst = longformer_folders
    hf = LongformerModel.from_pretrained(src, dtype=dtype).eval()
    ours = AutoModel.from_pretrained(dst, dtype=dtype).eval()
    assert ours.config.mixer == "sliding" and ours.layers[0].block.mixer.has_global_tokens
    length = 13  # HF pads it to 16, a multiple of the largest window (8)
    global_mask = torch.zeros(2, length, dtype=torch.long)
    global_mask[0, [0, 5]] = 1
    global_mask[1, 2] = 1
    outputs = {}
    for padded in (0, 4):
        ids, mask, types = _batch(LONGFORMER["vocab_size"], length, hf.config.pad_token_id, padded)
        for use_global in (False, True):
            kwargs = dict(
                attention_mask=mask, token_type_ids=types, global_attention_mask=global_mask if use_global else None
            )
            with torch.no_grad():
                hf_out = hf(ids, **kwargs).last_hidden_state
                ours_out = ours(ids, **kwargs).last_hidden_state
            assert _max_diff(hf_out, ours_out, mask) < LONGFORMER_TOLERANCE[dtype], (padded, use_global)
            outputs[padded, use_global] = hf_out
    # the cases differ: global attention and padding both change HF's outputs
    assert (outputs[0, True] - outputs[0, False]).abs().max() > 1e-3
    assert (outputs[4, False][1, :9] - outputs[0, False][1, :9]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_bigbird_hidden_states_equal_hugging_face(bigbird_folders, dtype):
    src, dst = bigbird_folders
    hf = BigBirdModel.from_pretrained(src, dtype=dtype).eval()
    ours = AutoModel.from_pretrained(dst, dtype=dtype).eval()
    assert ours.config.mixer == "block_sparse"
    ids, mask, types = _batch(BIGBIRD["vocab_size"], SPARSE_LENGTH, hf.config.pad_token_id, padded=3)
    hf_out, plans = _bigbird_forward_with_plans(hf, lambda: hf(ids, attention_mask=mask, token_type_ids=types))
    assert len(plans) == BIGBIRD["num_hidden_layers"]  # HF used block-sparse attention in every layer
    _hand_plans(ours, plans, SPARSE_LENGTH, BIGBIRD["block_size"])
    with torch.no_grad():
        ours_out = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert _max_diff(hf_out.last_hidden_state, ours_out, mask) < TOLERANCE[dtype]

    # short inputs: HF switches to full attention, and so do we
    ids, mask, types = ids[:, :SHORT_LENGTH].clone(), mask[:, :SHORT_LENGTH].clone(), types[:, :SHORT_LENGTH]
    ids[1, -2:], mask[1, -2:] = hf.config.pad_token_id, 0
    with torch.no_grad():
        hf_out = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours_out = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert hf.attention_type == "original_full"
    assert _max_diff(hf_out, ours_out, mask) < TOLERANCE[dtype]


def test_bigbird_that_never_reaches_block_sparse_lengths_converts_to_full_attention(tmp_path):
    """(5 + 2r) b >= max_position_embeddings: HF always falls back to full attention, so the mixer is `full`."""
    config = BigBirdConfig(**{**BIGBIRD, "block_size": 8, "num_random_blocks": 3})  # 88 >= 64
    src = _save_perturbed(BigBirdModel(config), tmp_path / "hf")
    ours = AutoModel.from_pretrained(convert_hf_folder(src, tmp_path / "longlm")).eval()
    assert ours.config.mixer == "full"
    hf = BigBirdModel.from_pretrained(src).eval()
    ids, mask, _ = _batch(BIGBIRD["vocab_size"], 40, config.pad_token_id, padded=5)
    with torch.no_grad():
        hf_out, ours_out = (model(ids, attention_mask=mask).last_hidden_state for model in (hf, ours))
    assert _max_diff(hf_out, ours_out, mask) < 1e-4


# --------------------------------------------------------------------------------------------------
# masked-LM heads, the other heads, tokenizers
# --------------------------------------------------------------------------------------------------
@requires_tokenizer_data
@pytest.mark.parametrize("family", ["longformer", "big_bird"])
def test_masked_lm_logits_equal_hugging_face(mlm_folders, family):
    src, dst, tokenizer = mlm_folders[family]
    hf = AutoModelForMaskedLM.from_pretrained(src).eval()
    ours = AutoModelForMaskedLM.from_pretrained(dst).eval()
    assert type(ours).__name__ == "LongLMForMaskedLM"
    assert ours.lm_head.decoder.weight is ours.model.embed_tokens.weight  # tied, as HF's
    torch.testing.assert_close(ours.lm_head.decoder.weight, hf.get_output_embeddings().weight, rtol=0, atol=0)
    paragraphs = _pg19_text(4000).split("\n\n")
    text = [paragraphs[6], paragraphs[2]]  # a long paragraph (truncated) and a short one (padded)
    batch = tokenizer(text, padding=True, truncation=True, max_length=SPARSE_LENGTH, return_tensors="pt")
    batch.pop("token_type_ids", None)
    assert batch["input_ids"].shape[1] == SPARSE_LENGTH and not batch["attention_mask"][1].all()
    if family == "big_bird":  # a block-sparse length
        hf_logits, plans = _bigbird_forward_with_plans(hf.bert, lambda: hf(**batch).logits)
        _hand_plans(ours.model, plans, SPARSE_LENGTH, BIGBIRD["block_size"])
    else:
        with torch.no_grad():
            hf_logits = hf(**batch).logits
    with torch.no_grad():
        ours_logits = ours(**batch).logits
    assert _max_diff(hf_logits, ours_logits, batch["attention_mask"]) < 1e-4


@requires_tokenizer_data
def test_converted_folders_load_in_every_longlm_head(mlm_folders, longformer_folders):
    src, dst, tokenizer = mlm_folders["longformer"]
    hf_config = json.loads((src / "config.json").read_text())
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "longlm" and "AutoModelForQuestionAnswering" in config["auto_map"]
    assert (dst / "modeling_longlm.py").is_file()  # remote code
    for name in ("sep_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        assert config[name] == hf_config[name] == getattr(tokenizer, name)
    assert config["position_offset"] == tokenizer.pad_token_id + 1

    mlm = AutoModelForMaskedLM.from_pretrained(dst)
    qa = AutoModelForQuestionAnswering.from_pretrained(dst).eval()
    assert type(qa).__name__ == "LongLMForQuestionAnswering"
    global_kv = [m.model.layers[1].block.mixer.kv_global_proj.weight for m in (qa, mlm)]
    torch.testing.assert_close(*global_kv)
    pair = tokenizer(["Who wrote it?"], [_pg19_text(300)], truncation="only_second", max_length=40, return_tensors="pt")
    with torch.no_grad():
        out = qa(input_ids=pair["input_ids"], attention_mask=pair["attention_mask"])
    question_end = pair["input_ids"][0].tolist().index(tokenizer.sep_token_id)
    assert out.global_attention_mask[0].nonzero().flatten().tolist() == list(range(question_end))
    assert out.start_logits.shape == pair["input_ids"].shape

    base_src, base_dst = longformer_folders  # a backbone folder: the MLM head starts fresh
    hf_base = LongformerModel.from_pretrained(base_src)
    fresh = AutoModelForMaskedLM.from_pretrained(base_dst)
    torch.testing.assert_close(fresh.model.embed_positions.weight, hf_base.embeddings.position_embeddings.weight)


@requires_tokenizer_data
@pytest.mark.parametrize("family", ["longformer", "big_bird"])
def test_the_tokenizer_is_copied(mlm_folders, longformer_folders, family):
    _, dst, tokenizer = mlm_folders[family]
    copied = AutoTokenizer.from_pretrained(dst)
    text = _pg19_text(2000)
    assert copied(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert copied.sep_token_id == tokenizer.sep_token_id and copied.pad_token_id == tokenizer.pad_token_id
    _, base_dst = longformer_folders  # its source had no tokenizer
    assert not [name for name in TOKENIZER_FILES if (base_dst / name).exists()]


def test_script_converts_and_prints_the_folder(longformer_folders, tmp_path, monkeypatch, capsys):
    src, _ = longformer_folders
    monkeypatch.setattr(sys, "argv", ["convert_hf.py", str(src), str(tmp_path / "out")])
    runpy.run_path(str(REPO / "scripts" / "convert_hf.py"), run_name="__main__")
    assert capsys.readouterr().out.strip() == f"longlm folder written to {tmp_path / 'out'}"
    assert AutoModel.from_pretrained(tmp_path / "out").config.mixer == "sliding"


# --------------------------------------------------------------------------------------------------
# bad inputs: one clear sentence each
# --------------------------------------------------------------------------------------------------
def _config_only(folder: Path, config, **edits) -> Path:
    config.save_pretrained(folder)
    if edits:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **edits}))
    return folder


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d, r"has no config\.json; expected a folder written by transformers' save_pretrained"),
        (
            lambda d: _config_only(d, BertConfig(**TINY)),
            r"config\.json' has model_type 'bert'; longlm converts only \['big_bird', 'longformer'\]\.",
        ),
        (
            lambda d: _config_only(d, BigBirdConfig(**BIGBIRD, is_decoder=True)),
            r"describes a decoder \(is_decoder or add_cross_attention is true\); longlm converts bidirectional",
        ),
        (
            lambda d: _config_only(d, BigBirdConfig(**BIGBIRD), attention_type="sliding"),
            r"has attention_type 'sliding'; expected 'block_sparse' or 'original_full'\.",
        ),
        (
            lambda d: _config_only(d, LongformerConfig(**LONGFORMER), architectures=["LongformerForQuestionAnswering"]),
            r"names architecture 'LongformerForQuestionAnswering'; longlm converts the backbone",
        ),
        (
            lambda d: _config_only(
                d, LongformerConfig(**LONGFORMER, hidden_act="relu"), architectures=["LongformerForMaskedLM"]
            ),
            r"hidden_act 'relu', but Longformer's MLM head always applies gelu",
        ),
        (
            lambda d: _config_only(d, LongformerConfig(**LONGFORMER), position_embedding_type="relative_key"),
            r"has position_embedding_type 'relative_key'; longlm converts only 'absolute'\.",
        ),
    ],
    ids=["no-config", "model-type", "decoder", "attention-type", "architecture", "head-activation", "positions"],
)
def test_bad_source_is_one_sentence(tmp_path, make, match):
    src = make(tmp_path / "src")
    src.mkdir(exist_ok=True)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        convert_hf_folder(src, tmp_path / "dst")


def test_masked_lm_config_over_backbone_weights_is_one_sentence(longformer_folders, tmp_path):
    """config.json says ForMaskedLM but the weights hold no head: refused, not converted with a random head."""
    src, _ = longformer_folders
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    _config_only(folder, LongformerConfig.from_pretrained(src), architectures=["LongformerForMaskedLM"])
    with pytest.raises(ValueError, match=r"The weights in '.*' lack \['lm_head\..*'\]; expected a complete longformer"):
        convert_hf_folder(folder, tmp_path / "dst")
