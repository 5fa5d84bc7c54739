"""Masked-LM pretraining: BERT masking on real text, every bidirectional mixer and `rmt` trained with it, exact
resume, and `scripts/pretrain.py` writing a folder that AutoModelForMaskedLM and pipeline("fill-mask") load."""
from __future__ import annotations

import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from longlm import MIXERS, LongLMConfig, LongLMForMaskedLM
from longlm.data.encoder_tokens import with_encoder_tokens
from longlm.data.enwik8 import Enwik8Corpus
from longlm.data.pg19 import PG19Corpus
from longlm.data.streams import SegmentStreams, memory_for_segment
from longlm.training import CausalLMPretraining, LMDataModule, export_checkpoint
from longlm.training.masking import MaskingOptions, TokenMasker
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, REPO, SHARED_DATA, requires_shared_data

pytestmark = requires_shared_data

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0, mem_len=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache for the file: the PG-19 BPE is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pg19(cache_dir):
    return PG19Corpus(PG19_SAMPLE, cache_dir=cache_dir, vocab_size=1000)


@pytest.fixture(scope="module")
def enwik8(cache_dir):
    return Enwik8Corpus(ENWIK8_SAMPLE, cache_dir=cache_dir)


def _rows(tokens: np.ndarray, rows: int, length: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(tokens[: rows * length], dtype=np.int64)).view(rows, length)


# --------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corpus", ["pg19", "enwik8"])
def test_bert_masking_statistics_on_real_text(corpus, request):
    data = request.getfixturevalue(corpus)
    tokenizer = with_encoder_tokens(data.tokenizer)
    ids = _rows(data.split("validation").tokens, 16, 2048)
    ids[:, -7:] = tokenizer.pad_token_id  # padding, and the text's own </s> and <unk>: never selected
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert special.sum() >= 16 * 7
    corrupted, labels = TokenMasker(tokenizer)(ids, torch.Generator().manual_seed(0))

    selected = labels != -100
    assert not (selected & special).any() and torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])  # labels: the original ids, only where selected
    assert torch.equal(corrupted[~selected], ids[~selected])  # nothing else is touched
    assert selected.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    masked = selected & (corrupted == tokenizer.mask_token_id)
    replaced = selected & ~masked & (corrupted != ids)
    kept = selected & (corrupted == ids)
    total = selected.sum()
    assert masked.sum() / total == pytest.approx(0.8, abs=0.02)
    assert replaced.sum() / total == pytest.approx(0.1, abs=0.02)  # (a random token may equal the original)
    assert kept.sum() / total == pytest.approx(0.1, abs=0.02)
    assert not torch.isin(corrupted[replaced], torch.tensor(tokenizer.all_special_ids)).any()


def test_masking_draws_on_the_global_rng_and_a_generator_repeats_it(pg19):
    masker = TokenMasker(with_encoder_tokens(pg19.tokenizer))
    ids = _rows(pg19.split("validation").tokens, 4, 256)
    torch.manual_seed(3)
    first = masker(ids)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, masker(ids)))
    again = [masker(ids, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(again[0][1], again[1][1]) and not torch.equal(again[0][1], first[1])


def _words(pieces: list[str], is_start) -> list[list[int]]:
    """Positions grouped into words, from each piece's text (independent of the masker's tables)."""
    words: list[list[int]] = []
    for index, piece in enumerate(pieces):
        if index == 0 or is_start(piece):
            words.append([])
        words[-1].append(index)
    return words


def _check_whole_words(tokenizer, ids: torch.Tensor, is_start) -> None:
    _, labels = TokenMasker(tokenizer, MaskingOptions(whole_word=True))(ids, torch.Generator().manual_seed(1))
    selected_words = long_selected = 0
    for row in range(ids.shape[0]):
        pieces = tokenizer.convert_ids_to_tokens(ids[row].tolist())
        for word in _words(pieces, is_start):
            chosen = {bool(labels[row, i] != -100) for i in word}
            assert len(chosen) == 1, [pieces[i] for i in word]  # all of a word or none of it
            selected_words += chosen.pop()
            long_selected += len(word) > 1 and bool(labels[row, word[0]] != -100)
    words = sum(len(_words(tokenizer.convert_ids_to_tokens(r.tolist()), is_start)) for r in ids)
    assert selected_words / words == pytest.approx(0.15, abs=0.02) and long_selected > 20


def _spelled_words(tokenizer, text: str, **kwargs) -> list[str]:
    """`text`'s tokens joined into the words the masker sees."""
    ids = tokenizer(text, **kwargs)["input_ids"]
    starts = TokenMasker(tokenizer, MaskingOptions(whole_word=True)).word_starts(torch.tensor([ids]))[0].tolist()
    words: list[str] = []
    for piece, start in zip(tokenizer.convert_ids_to_tokens(ids), starts):
        if start or not words:
            words.append(piece)
        else:
            words[-1] += piece
    return words


def test_whole_word_masking_selects_whole_words_of_the_byte_level_bpe(pg19):
    tokenizer = with_encoder_tokens(pg19.tokenizer)
    ids = _rows(pg19.split("validation").tokens, 8, 1024)
    _check_whole_words(tokenizer, ids, lambda piece: piece[0] in "ĠĊĉč")
    assert _spelled_words(tokenizer, "Hello there,\nworld") == ["<s>", "Hello", "Ġthere,", "Ċworld", "</s>"]


def test_whole_word_masking_of_bytes_puts_a_space_with_the_word_after_it(enwik8):
    tokenizer = with_encoder_tokens(enwik8.tokenizer)
    ids = _rows(enwik8.split("validation").tokens, 4, 2048)
    _check_whole_words(tokenizer, ids, lambda piece: piece in (" ", "\t", "\n", "\r"))
    assert _spelled_words(tokenizer, "It is a truth", add_special_tokens=False) == ["It", " is", " a", " truth"]


def test_whole_word_masking_with_sentencepiece_and_wordpiece(tmp_path, pg19):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    shutil.copy(SHARED_DATA / "tokenizers" / "botchan_en_bpe_1000.model", tmp_path / "tokenizer.model")
    sentencepiece = with_encoder_tokens(LlamaTokenizer.from_pretrained(tmp_path))
    text = PG19Corpus.read(pg19.books("validation")[0])[:60000]
    ids = torch.tensor(sentencepiece(text, add_special_tokens=False)["input_ids"][: 4 * 1024]).view(4, 1024)
    _check_whole_words(sentencepiece, ids, lambda piece: piece.startswith("▁"))

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"]))
    wordpiece = with_encoder_tokens(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"))
    ids = torch.tensor(wordpiece(text, add_special_tokens=False)["input_ids"][: 4 * 1024]).view(4, 1024)
    _check_whole_words(wordpiece, ids, lambda piece: not piece.startswith("##"))


# --------------------------------------------------------------------------------------------------
# the model: every bidirectional mixer, and rmt memory
# --------------------------------------------------------------------------------------------------
MIXER_SETTINGS = {  # tiny, and really sparse at 64 tokens; mixers not listed run with the preset's defaults
    "relative": dict(position_embedding_type="none"),
    "knn": dict(mixer="relative", knn_layers=[1], memory="knn", mem_len=16, knn_memory_size=256, knn_top_k=8, position_embedding_type="none"),
    "sliding": dict(attention_window=16),
    "block_sparse": dict(block_size=8, num_random_blocks=1),
    "lsh": dict(num_buckets=4, lsh_chunk_length=16),
    "routing": dict(attention_window=16, num_clusters=4, num_routing_heads=1),
}
CASES = {
    name: {"mixer": name, **({"memory": MIXERS.get(name).requires_memory} if MIXERS.get(name).requires_memory else {}),
           **MIXER_SETTINGS.get(name, {})}
    for name in MIXERS.names()
}
CASES["rmt"] = dict(mixer="relative", memory="rmt", num_memory_tokens=4, position_embedding_type="none")


def _masked_lm(case: str, vocab_size: int) -> LongLMForMaskedLM:
    return LongLMForMaskedLM(LongLMConfig.from_preset("full", **{**TINY, **CASES[case]}, is_decoder=False, vocab_size=vocab_size))


def _masked_loss(model, masker, segments, generator=None) -> torch.Tensor:
    """Mean MLM loss over consecutive segments, the memory carried from each to the next."""
    memory, losses = None, []
    for batch in segments:
        ids, labels = masker(batch["input_ids"], generator)
        out = model(ids, labels=labels, memory=memory_for_segment(memory, batch))
        memory = None if out.memory is None else out.memory.detach()
        losses.append(out.loss)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("case", list(CASES))
def test_masked_lm_trains_with_every_bidirectional_mixer_and_rmt(case, enwik8):
    """Every registered mixer attends bidirectionally (`is_decoder=False`); knn with its store filled by the
    earlier segments, which it retrieves from (no token of the current segment is ever in it)."""
    tokenizer = with_encoder_tokens(enwik8.tokenizer)
    masker = TokenMasker(tokenizer)
    train = SegmentStreams(enwik8.split("train").tokens, 8, 64)
    held_out = SegmentStreams(enwik8.split("validation").tokens, 8, 64)
    model = _masked_lm(case, len(tokenizer))
    evaluate = [held_out.segment(i) for i in range(3)]

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(_masked_loss(model, masker, evaluate, torch.Generator().manual_seed(0)))

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(0, 40, 2):  # two segments per step, the memory kept in the graph between them
        loss = _masked_loss(model, masker, [train.segment(step), train.segment(step + 1)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < before - 1.0, case


def test_rmt_memory_carries_the_first_segment_into_the_second_and_gradients_reach_it(enwik8):
    tokenizer = with_encoder_tokens(enwik8.tokenizer)
    model = _masked_lm("rmt", len(tokenizer)).eval()
    streams = SegmentStreams(enwik8.split("train").tokens, 2, 32)
    first, second = streams.segment(0), streams.segment(1)
    ids, labels = TokenMasker(tokenizer)(second["input_ids"], torch.Generator().manual_seed(0))
    out = model(first["input_ids"])
    written = out.memory.memory
    written.retain_grad()
    with_memory = model(ids, labels=labels, memory=out.memory)
    assert not torch.allclose(with_memory.logits, model(ids).logits, atol=1e-4)
    with_memory.loss.backward()
    assert written.grad.abs().sum() > 0  # the second segment's loss reaches the memory tokens written by the first
    assert model.model.memory.initial.weight.grad.abs().sum() > 0  # and the learned memory the first one read


# --------------------------------------------------------------------------------------------------
# Lightning: exact resume, fixed evaluation masks, the objective's errors
# --------------------------------------------------------------------------------------------------
class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(root, cache_dir, max_steps, *, ckpt_path=None, every=None, val_every=None):
    L.seed_everything(7)
    data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=4, tgt_len=32, eval_batch_size=4, eval_tgt_len=32,
                        cache_dir=str(cache_dir), encoder_tokens=True)
    config = {**TINY, "num_memory_tokens": 4, "bptt_depth": 2, "hidden_dropout_prob": 0.1}
    module = CausalLMPretraining("rmt", config=config, vocab_size=data.vocab_size, learning_rate=3e-3, task="mlm",
                                 masking={"whole_word": True})
    recorder = LossRecorder()
    callbacks = [recorder]
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=3 if val_every else 0, val_check_interval=val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, callbacks=callbacks, enable_checkpointing=bool(every),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, recorder, trainer, data


def test_masked_lm_with_rmt_resumes_exactly_and_validation_masks_are_fixed(tmp_path, cache_dir):
    """Masks come from the global RNG (saved per rank in checkpoints): the resumed run takes the same steps.
    Validation in between (fixed-seed masks) neither changes them nor varies from pass to pass."""
    module, uninterrupted, trainer, data = _fit(tmp_path / "a", cache_dir, 6, every=3, val_every=2)
    assert not module.model.config.is_decoder and module.tokenizer.mask_token == "<mask>"
    assert module.model.config.vocab_size == len(module.tokenizer) == 261
    _, resumed, _, _ = _fit(tmp_path / "b", cache_dir, 6, ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0-step=3.ckpt"))
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], abs=1e-6)
    state = torch.get_rng_state()
    first, second = (trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"] for _ in range(2))
    assert first == second and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(task="mlm", config={"is_decoder": True}), r"model.task 'mlm' trains a bidirectional encoder, but model.config.is_decoder is true"),
        (dict(task="causal", masking={"probability": 0.2}), r"model.masking is set but model.task is 'causal'"),
        (dict(task="mlm", masking={"prob": 0.2}), r"Unknown masking option\(s\) \['prob'\]"),
        (dict(task="mlm", masking={"probability": 1.5}), r"masking.probability must be a number in \(0, 1\), got 1.5"),
        (dict(task="seq2seq"), r"Unknown task 'seq2seq'; expected one of \['causal', 'mlm'\]"),
    ],
)
def test_objective_settings_errors_are_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMPretraining("longformer", vocab_size=261, **kwargs)


def test_masked_lm_without_a_mask_token_says_what_is_missing(enwik8):
    module = CausalLMPretraining("longformer", config=TINY, vocab_size=259, task="mlm")
    module.tokenizer = enwik8.tokenizer  # the data module without encoder_tokens
    batch = SegmentStreams(enwik8.split("validation").tokens, 2, 16).segment(0)
    with pytest.raises(ValueError, match="needs a tokenizer with a mask token, but ByT5Tokenizer has none"):
        module.training_step(batch, 0)


@pytest.mark.parametrize("dataset", ["pg19", "enwik8"])
def test_tiny_mlm_configs_describe_a_sparse_longformer_encoder(dataset):
    recipe = yaml.safe_load((REPO / "configs" / dataset / "longformer-mlm-tiny.yaml").read_text())
    module = CausalLMPretraining(vocab_size=261, **recipe["model"])
    config = module.model.config
    assert type(module.model) is LongLMForMaskedLM and not config.is_decoder
    assert (config.mixers, config.attention_window, config.hidden_size) == (["sliding"] * 3, 128, 128)
    assert recipe["data"]["tgt_len"] == 512 and module.objective.options == MaskingOptions(0.15, whole_word=False)


# --------------------------------------------------------------------------------------------------
# the user's path: pretrain.py -> hf folder -> AutoModelForMaskedLM / fill-mask
# --------------------------------------------------------------------------------------------------
def test_pretrain_script_with_the_pg19_config_writes_a_fill_mask_folder(tmp_path, cache_dir):
    import longlm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    root = tmp_path / "run"
    args = [
        str(REPO / "scripts" / "pretrain.py"), "fit", "--config", str(REPO / "configs" / "pg19" / "longformer-mlm-tiny.yaml"),
        "--data.path", str(PG19_SAMPLE), "--data.cache_dir", str(cache_dir), "--data.tokenizer_vocab_size", "1000",
        "--data.tgt_len", "256", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(root),
    ]
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    folder = root / "hf"
    model = AutoModelForMaskedLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model) is LongLMForMaskedLM and not model.config.is_decoder
    assert tokenizer.mask_token == "<mask>" and model.config.vocab_size == len(tokenizer) == 1002
    pair = tokenizer("Who is she?", "She is Emma.")["input_ids"]
    question, context = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Who is she?", "She is Emma."))
    bos, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert pair == [bos, *question, sep, sep, *context, sep]  # <s> q </s></s> c </s>
    predictions = pipeline("fill-mask", model=str(folder))(f"It is a truth universally{tokenizer.mask_token}")
    assert len(predictions) == 5 and all(p["token_str"] and 0 <= p["score"] <= 1 for p in predictions)

    # the checkpoint alone exports the same encoder
    exported = export_checkpoint(root / "checkpoints" / "last.ckpt", tmp_path / "exported")
    again = AutoModelForMaskedLM.from_pretrained(exported).eval()
    ids = tokenizer("It was the best of times", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model.eval()(ids).logits)
    assert AutoTokenizer.from_pretrained(exported).mask_token_id == tokenizer.mask_token_id
