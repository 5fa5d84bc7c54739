"""The QA head: global attention on the question, loading from decoder checkpoints, HF's pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from longlm import LongLMConfig, LongLMForCausalLM, LongLMForQuestionAnswering
from longlm.data.encoder_tokens import with_encoder_tokens
from longlm.data.subword import train_bpe
from longlm.evaluation.qa import load_qa_model
from tests.paths import PG19_SAMPLE, SQUAD2_DEV, requires_qa_data, requires_shared_data

pytestmark = [requires_shared_data, requires_qa_data]

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real byte-level BPE trained on the PG-19 sample, with the encoder tokens and pair template."""
    books = sorted((PG19_SAMPLE / "train").glob("*.txt"))
    texts = [book.read_text(encoding="utf-8", errors="replace")[:300_000] for book in books]
    bpe = train_bpe(texts, 800, tmp_path_factory.mktemp("bpe") / "bpe800")
    return with_encoder_tokens(bpe)


@pytest.fixture(scope="module")
def squad_pairs():
    """(question, context) of the first answerable SQuAD v2 dev questions."""
    data = json.loads(SQUAD2_DEV.read_text())
    pairs = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa["answers"]:
                    pairs.append((qa["question"], paragraph["context"]))
    return pairs[:4]


def _qa_model(tokenizer, preset: str = "longformer", **overrides) -> LongLMForQuestionAnswering:
    config = LongLMConfig.from_preset(
        preset, **{**TINY, "vocab_size": len(tokenizer), "is_decoder": False, "attention_window": 16,
                   "sep_token_id": tokenizer.sep_token_id, **overrides}
    )
    return LongLMForQuestionAnswering(config).eval()


def test_global_attention_lands_on_exactly_the_question_tokens(tokenizer, squad_pairs):
    """Longformer's convention: `<s>` and the question (every token before the first `</s>`) are global, no
    context token is, and padding rows of different question lengths each get their own."""
    batch = tokenizer([q for q, _ in squad_pairs], [c for _, c in squad_pairs], padding=True, return_tensors="pt")
    model = _qa_model(tokenizer)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for row in range(len(squad_pairs)):
        sequence_ids = batch.sequence_ids(row)
        expected = [position == 0 or sequence_ids[position] == 0 for position in range(len(sequence_ids))]
        assert out.global_attention_mask[row].tolist() == expected
        question_tokens = tokenizer(squad_pairs[row][0], add_special_tokens=False)["input_ids"]
        assert batch["input_ids"][row, 1 : 1 + len(question_tokens)].tolist() == question_tokens
        assert int(out.global_attention_mask[row].sum()) == 1 + len(question_tokens)
    # the mask reaches the mixers: the same logits as passing it by hand, different ones without it
    with torch.no_grad():
        given = model(**batch, global_attention_mask=out.global_attention_mask)
        none = model(**batch, global_attention_mask=torch.zeros_like(batch["input_ids"]))
    torch.testing.assert_close(given.start_logits, out.start_logits)
    valid = batch["attention_mask"].bool()
    assert not torch.allclose(none.start_logits[valid], out.start_logits[valid])


def test_mixers_without_global_tokens_get_no_global_mask(tokenizer, squad_pairs):
    question, context = squad_pairs[0]
    batch = tokenizer(question, context, return_tensors="pt")
    with torch.no_grad():
        out = _qa_model(tokenizer, preset="full")(**batch)
    assert out.global_attention_mask is None
    assert out.start_logits.shape == batch["input_ids"].shape


def test_question_without_separator_is_one_clear_sentence(tokenizer):
    model = _qa_model(tokenizer)
    ids = torch.full((2, 12), 50)
    ids[0, 4] = tokenizer.sep_token_id
    with pytest.raises(ValueError, match=r"^Row 1 of input_ids holds no sep_token_id \(\d+\), so its question cannot be found; .*\.$"):
        model(input_ids=ids)
    model.config.sep_token_id = None
    with pytest.raises(ValueError, match=r"needs config\.sep_token_id"):
        model(input_ids=ids)


def test_span_loss_trains_the_head_and_ignores_positions_outside(tokenizer, squad_pairs):
    question, context = squad_pairs[0]
    batch = tokenizer(question, context, return_tensors="pt")
    model = _qa_model(tokenizer).train()
    length = batch["input_ids"].shape[1]
    inside = model(**batch, start_positions=torch.tensor([length - 3]), end_positions=torch.tensor([length - 2])).loss
    inside.backward()
    assert model.qa_outputs.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()
    ignored = model(**batch, start_positions=torch.tensor([length + 5]), end_positions=torch.tensor([length + 5])).loss
    assert torch.isnan(ignored) or ignored == 0  # every position ignored: HF's convention gives nan (0/0)


def test_loads_from_a_decoder_checkpoint(tokenizer, squad_pairs, tmp_path):
    """A causal LM folder -> QA: the backbone carries over, the span head is new; the decoder stays causal
    unless the loader is told `is_decoder=False`."""
    decoder = LongLMForCausalLM(LongLMConfig.from_preset("full", **TINY, vocab_size=len(tokenizer)))
    decoder.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_qa_model(tmp_path)
    assert isinstance(model, LongLMForQuestionAnswering) and model.config.is_decoder
    assert model.config.sep_token_id == loaded_tokenizer.sep_token_id
    for name, tensor in decoder.model.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor)
    question, context = squad_pairs[0]
    ids = loaded_tokenizer(question, context, return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -2] = (changed[0, -2] + 1) % len(loaded_tokenizer)
    model.eval()
    with torch.no_grad():
        before, after = model(input_ids=ids).start_logits, model(input_ids=changed).start_logits
    torch.testing.assert_close(before[:, :-2], after[:, :-2])  # causal: earlier tokens cannot see the change
    bidirectional, _ = load_qa_model(tmp_path, is_decoder=False)
    with torch.no_grad():
        before, after = bidirectional(input_ids=ids).start_logits, bidirectional(input_ids=changed).start_logits
    assert not torch.allclose(before[:, :-2], after[:, :-2])


def test_a_tokenizer_without_encoder_tokens_grows_the_embeddings(tmp_path):
    """A decoder trained with PG-19's plain BPE (no <s>, no <mask>): loading for QA adds them and resizes."""
    books = sorted((PG19_SAMPLE / "train").glob("*.txt"))
    plain = train_bpe([books[0].read_text(encoding="utf-8", errors="replace")[:200_000]], 400, tmp_path / "bpe")
    assert plain.mask_token is None
    LongLMForCausalLM(LongLMConfig.from_preset("full", **TINY, vocab_size=len(plain))).save_pretrained(tmp_path / "m")
    plain.save_pretrained(tmp_path / "m")
    model, tokenizer = load_qa_model(tmp_path / "m")
    assert len(tokenizer) == len(plain) + 2 and model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer("a", "b")["input_ids"][0] == tokenizer.cls_token_id


def test_slow_tokenizer_is_refused_in_one_sentence(tmp_path):
    from transformers import ByT5Tokenizer

    LongLMForCausalLM(LongLMConfig.from_preset("full", **TINY)).save_pretrained(tmp_path)
    ByT5Tokenizer(extra_ids=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^Question answering with '.*' needs a fast tokenizer .* got ByT5Tokenizer; .*\.$"):
        load_qa_model(tmp_path)


def test_pipeline_question_answering_answers(tokenizer, squad_pairs, tmp_path):
    """`pipeline("question-answering", model=DIR)` runs our model and returns the best context span our own
    logits give (brute force over every valid (start, end) pair), with its exact text."""
    from transformers import pipeline

    model = _qa_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    qa = pipeline("question-answering", model=str(tmp_path), device="cpu")
    question, context = squad_pairs[1]
    answer = qa(question=question, context=context, max_answer_len=15, max_seq_len=512, align_to_words=False)
    assert answer["answer"] == context[answer["start"] : answer["end"]] and answer["answer"]

    encoding = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"])
    start, end = out.start_logits[0].numpy(), out.end_logits[0].numpy()
    in_context = np.array([sid == 1 for sid in encoding.sequence_ids(0)])
    scores = start[:, None] + end[None, :]
    allowed = in_context[:, None] & in_context[None, :] & np.triu(np.ones_like(scores, dtype=bool)) & ~np.triu(np.ones_like(scores, dtype=bool), k=15)
    best_start, best_end = np.unravel_index(np.where(allowed, scores, -np.inf).argmax(), scores.shape)
    offsets = encoding["offset_mapping"][0]
    assert (answer["start"], answer["end"]) == (int(offsets[best_start][0]), int(offsets[best_end][1]))


def test_finetuning_module_trains_in_train_mode(tokenizer, tmp_path):
    """from_pretrained hands back eval mode and Lightning keeps the modes it finds: the module must switch
    dropout back on, or fine-tuning silently runs without it."""
    from longlm.training.qa_module import QuestionAnsweringFinetuning

    _qa_model(tokenizer, hidden_dropout_prob=0.1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = QuestionAnsweringFinetuning(pretrained=str(tmp_path))
    assert all(m.training for m in module.model.modules())
    assert module.model.config.sep_token_id == module.tokenizer.sep_token_id


def test_pipeline_top_k_returns_the_k_best_distinct_answers_best_first(tokenizer, squad_pairs, tmp_path):
    """HF's `top_k`: a list of k answers, ranked by span score (start + end logit), all distinct, the first
    one the answer `top_k=1` gives; every allowed span scores at most the k-th (brute force)."""
    from transformers import pipeline

    from longlm.data.qa_spans import best_span, top_spans

    model = _qa_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    qa = pipeline("question-answering", model=str(tmp_path), device="cpu")
    question, context = squad_pairs[1]
    single = qa(question=question, context=context, max_answer_len=15, max_seq_len=512)
    answers = qa(question=question, context=context, max_answer_len=15, max_seq_len=512, top_k=5)
    assert isinstance(answers, list) and len(answers) == 5
    assert answers[0] == single
    assert len({(a["start"], a["end"]) for a in answers}) == 5
    assert all(a["answer"] == context[a["start"] : a["end"]] and 0 <= a["score"] <= 1 for a in answers)

    encoding = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"])
    start, end = out.start_logits[0].numpy().astype(np.float64), out.end_logits[0].numpy().astype(np.float64)
    in_context = np.array([sid == 1 for sid in encoding.sequence_ids(0)])
    spans = top_spans(start, end, in_context, 15, 5)
    assert spans[0] == best_span(start, end, in_context, 15)
    scores = start[:, None] + end[None, :]
    allowed = in_context[:, None] & in_context[None, :] & np.triu(np.ones_like(scores, dtype=bool)) & ~np.triu(np.ones_like(scores, dtype=bool), k=15)
    assert np.sort(scores[allowed])[::-1][:5] == pytest.approx([score for score, _, _ in spans])
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
        qa(question=question, context=context, top_k=0)
