"""Corpora, caching and ordered streams on the real samples in ../shared/data."""
from __future__ import annotations

import gzip
import zipfile

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from longlm.data import CORPORA, SegmentStreams
from longlm.data.enwik8 import split_bounds
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, requires_shared_data

pytestmark = requires_shared_data


def test_enwik8_split_is_90_5_5_of_the_real_file_and_exact_for_100M():
    assert split_bounds(100_000_000) == {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
    size = ENWIK8_SAMPLE.stat().st_size
    bounds = split_bounds(size)
    assert bounds["train"][1] == size * 90 // 100 and bounds["test"] == (size * 95 // 100, size)


def test_enwik8_tokens_are_the_byt5_ids_and_splits_concatenate_to_the_file(tmp_path):
    corpus = CORPORA.get("enwik8")(ENWIK8_SAMPLE, cache_dir=tmp_path)
    parts = [corpus.split(s).tokens for s in ("train", "validation", "test")]
    raw = ENWIK8_SAMPLE.read_bytes()
    assert sum(len(p) for p in parts) == len(raw)
    head = raw[:2000].decode("utf-8", errors="ignore")
    expected = ByT5Tokenizer(extra_ids=0)(head, add_special_tokens=False).input_ids
    assert parts[0][: len(expected)].tolist() == expected
    assert len(corpus.tokenizer) == 259


def test_enwik8_reads_zip_and_gzip_the_same(tmp_path):
    raw = ENWIK8_SAMPLE.read_bytes()
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.writestr("enwik8", raw)
    (tmp_path / "enwik8.gz").write_bytes(gzip.compress(raw, compresslevel=1))
    plain = CORPORA.get("enwik8")(ENWIK8_SAMPLE, cache_dir=tmp_path / "c1").split("test").tokens
    for name in ("enwik8.zip", "enwik8.gz"):
        other = CORPORA.get("enwik8")(tmp_path / name, cache_dir=tmp_path / name.replace(".", "_")).split("test").tokens
        assert np.array_equal(plain, other)


@pytest.mark.parametrize("compression", ["raw", "zip", "gzip"])
def test_streamed_build_equals_reading_the_whole_file(tmp_path, monkeypatch, compression):
    """The split written chunk by chunk (chunks far smaller than the split, so words and chunk boundaries
    cross) holds the ids and the word count of the whole file read at once."""
    import longlm.data.enwik8 as enwik8

    raw = ENWIK8_SAMPLE.read_bytes()[:300_001]
    path = tmp_path / "bytes.raw"
    if compression == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("enwik8", raw)
    else:
        path.write_bytes(gzip.compress(raw, compresslevel=1) if compression == "gzip" else raw)
    monkeypatch.setattr(enwik8, "CHUNK_BYTES", 4099)
    corpus = CORPORA.get("enwik8")(path, cache_dir=tmp_path / "cache")
    for name, (start, end) in split_bounds(len(raw)).items():
        split = corpus.split(name)
        part = raw[start:end]
        assert np.array_equal(np.asarray(split.tokens), enwik8.bytes_to_ids(part))
        assert (split.num_words, split.num_bytes) == (len(part.split()), len(part))


def test_tokenised_split_is_cached_memory_mapped(tmp_path):
    corpus = CORPORA.get("enwik8")(ENWIK8_SAMPLE, cache_dir=tmp_path)
    first = corpus.split("validation")
    again = CORPORA.get("enwik8")(ENWIK8_SAMPLE, cache_dir=tmp_path).split("validation")
    assert isinstance(again.tokens, np.memmap)
    assert np.array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    assert len(list((tmp_path / "splits").iterdir())) == 1


def test_pg19_tokenizer_trained_on_train_split_cached_and_word_counts(tmp_path):
    corpus = CORPORA.get("pg19")(PG19_SAMPLE, cache_dir=tmp_path, vocab_size=1000)
    tok = corpus.tokenizer
    assert len(tok) == 1000
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    split = corpus.split("validation")
    text = (PG19_SAMPLE / "validation" / "1342.txt").read_text(encoding="utf-8", errors="replace")
    assert split.num_words == len(text.split())
    assert split.tokens[-1] == tok.eos_token_id
    assert tok.decode(split.tokens[:200].tolist()) == tok.decode(tok(text, add_special_tokens=False).input_ids[:200])
    # the trained tokenizer is cached: a second corpus loads it instead of training again
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1
    again = CORPORA.get("pg19")(PG19_SAMPLE, cache_dir=tmp_path, vocab_size=1000).tokenizer
    assert again.get_vocab() == tok.get_vocab()


def test_pg19_train_split_has_one_document_per_book(tmp_path):
    corpus = CORPORA.get("pg19")(PG19_SAMPLE, cache_dir=tmp_path, vocab_size=1000)
    train = corpus.split("train")
    books = sorted((PG19_SAMPLE / "train").glob("*.txt"), key=lambda p: int(p.stem))
    assert len(train.doc_starts) == len(books)
    eos = corpus.tokenizer.eos_token_id
    assert all(train.tokens[s - 1] == eos for s in train.doc_starts[1:])


def test_streams_are_contiguous_and_eval_scores_every_token_once():
    tokens = np.arange(1000, dtype=np.int64)
    streams = SegmentStreams(tokens, batch_size=3, seg_len=64, drop_last=False)
    seen = []
    for k in range(len(streams)):
        batch = streams.segment(k)
        assert np.array_equal(batch["labels"][:, :-1].numpy(), batch["input_ids"][:, 1:].numpy())
        if k + 1 < len(streams):
            assert np.array_equal(streams.segment(k + 1)["input_ids"][:, 0].numpy(), batch["labels"][:, -1].numpy())
        seen.append(batch["labels"].numpy())
    predicted = np.concatenate(seen, axis=1)
    stream_len = 1000 // 3
    for row in range(3):
        assert predicted[row].tolist() == list(range(row * stream_len + 1, (row + 1) * stream_len))
    train = SegmentStreams(tokens, batch_size=3, seg_len=64, drop_last=True)
    assert all(train.segment(k)["input_ids"].shape == (3, 64) for k in range(len(train)))


def test_streams_flag_rows_whose_segment_starts_a_document():
    tokens = np.arange(400)
    streams = SegmentStreams(tokens, batch_size=2, seg_len=50, doc_starts=np.array([0, 100, 250]))
    assert streams.segment(0)["new_document"].tolist() == [True, True]
    assert streams.segment(2)["new_document"].tolist() == [True, False]  # row 0 at 100
    assert streams.segment(1)["new_document"].tolist() == [False, True]  # row 1 at 200 + 50


def test_streams_mark_every_token_that_starts_a_document():
    tokens = np.arange(400)  # token value = its offset, so a start is visible in the ids
    starts = np.array([0, 37, 100, 263, 399])
    streams = SegmentStreams(tokens, batch_size=2, seg_len=50, doc_starts=starts)
    for index in range(len(streams)):
        batch = streams.segment(index)
        marked = set(batch["input_ids"][batch["document_starts"]].tolist())
        assert marked == set(batch["input_ids"].flatten().tolist()) & set(starts.tolist())
        assert batch["new_document"].tolist() == [index == 0 or bool(s) for s in batch["document_starts"][:, 0]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: CORPORA.get("enwik8")(d / "missing.txt"), "does not exist"),
        (lambda d: CORPORA.get("enwik8")(_touch(d / "empty.txt")), "is empty"),
        (lambda d: CORPORA.get("pg19")(d), "has no train/ subfolder"),
        (lambda d: CORPORA.get("wikitext")(d), "Unknown dataset 'wikitext'"),
    ],
)
def test_bad_data_paths_get_one_clear_sentence(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make(tmp_path)


def test_split_shorter_than_one_segment_is_refused():
    with pytest.raises(ValueError, match="fewer than one segment"):
        SegmentStreams(np.arange(100), batch_size=4, seg_len=32)


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("field", ["batch_size", "tgt_len", "eval_batch_size", "eval_tgt_len"])
@pytest.mark.parametrize("value", [0, -4])
def test_data_module_refuses_non_positive_lengths(tmp_path, field, value):
    from longlm.training import LMDataModule

    with pytest.raises(ValueError, match=rf"data\.{field} must be a positive integer, got {value}"):
        LMDataModule("enwik8", str(ENWIK8_SAMPLE), cache_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("kwargs, message", [({"tgt_len": 0}, "tgt_len must be a positive integer"), ({"tgt_len": 8, "mem_len": -1}, "mem_len must be a non-negative integer")])
def test_evaluation_refuses_bad_lengths(tmp_path, kwargs, message):
    from longlm import LongLMConfig, LongLMForCausalLM
    from longlm.evaluation import evaluate_stream

    model = LongLMForCausalLM(LongLMConfig.from_preset("transformer-xl", num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, mem_len=8))
    split = CORPORA.get("enwik8")(ENWIK8_SAMPLE, cache_dir=tmp_path).split("validation")
    with pytest.raises(ValueError, match=message):
        evaluate_stream(model, split, **kwargs)
