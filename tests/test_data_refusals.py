"""Damaged real data is refused with one sentence naming the file and the problem (issue 11, "Data:").

Every case starts from a slice of the real samples in ../shared/data copied into tmp_path, then damages
it: a split folder removed, invalid bytes injected into a book, whitespace stripped from real text, a split
truncated, a question blanked, a file compressed into binary.
"""
from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from longlm.data import CORPORA
from longlm.data.pg19 import PG19Corpus
from longlm.data.qa import load_qa_examples, load_squad
from longlm.data.subword import MAX_PRETOKEN_CHARS, byte_level_pre_tokenizer, train_bpe
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, REPO, SQUAD2_DEV, requires_qa_data, requires_shared_data

pytestmark = requires_shared_data

VOCAB = 512  # small enough to train in a moment on a slice, large enough to be a real BPE


def _pg19_slice(root: Path, chars: int = 60_000, train_books: int = 2) -> Path:
    """A PG-19 folder holding the first `chars` characters of real sample books (cut as text, so each
    file stays valid UTF-8), in the official layout."""
    for split, count in (("train", train_books), ("validation", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        for book in sorted((PG19_SAMPLE / split).glob("*.txt"))[:count]:
            (root / split / book.name).write_text(PG19Corpus.read(book)[:chars], encoding="utf-8")
    shutil.copy(PG19_SAMPLE / "metadata.csv", root / "metadata.csv")
    return root


def _data_module(folder: Path, cache: Path, **kwargs):
    from longlm.training import LMDataModule

    return LMDataModule(
        "pg19", str(folder), batch_size=2, tgt_len=32, eval_batch_size=2, eval_tgt_len=32,
        tokenizer_vocab_size=VOCAB, cache_dir=str(cache), **kwargs,
    )


def _inject(book: Path, junk: bytes) -> int:
    """Put `junk` between two ASCII bytes in the middle of `book`; returns its byte offset."""
    data = book.read_bytes()
    offset = len(data) // 2
    while data[offset - 1] >= 0x80 or data[offset] >= 0x80:
        offset += 1
    book.write_bytes(data[:offset] + junk + data[offset:])
    return offset


# ------------------------------------------------------------------------------------- missing splits


@pytest.mark.parametrize("removed", ["validation", "test"])
def test_pg19_folder_without_a_split_is_refused_at_setup_before_any_work(tmp_path, removed):
    folder = _pg19_slice(tmp_path / "pg19")
    shutil.rmtree(folder / removed)
    module = _data_module(folder, tmp_path / "cache")
    message = rf"^PG-19 folder '{re.escape(str(folder))}' has no {removed}/ subfolder; expected train/, validation/ and test/ of \{{id\}}\.txt files\.$"
    with pytest.raises(ValueError, match=message):
        module.setup("fit")
    assert not (tmp_path / "cache").exists()  # refused before a tokenizer was trained or a split tokenised


def test_each_stage_asks_for_the_splits_it_reads(tmp_path):
    folder = _pg19_slice(tmp_path / "pg19")
    shutil.rmtree(folder / "test")
    module = _data_module(folder, tmp_path / "cache")
    module.setup("validate")  # validation is there: nothing missing for this stage
    assert len(module.eval_split("validation").tokens) > 0
    with pytest.raises(ValueError, match=r"has no test/ subfolder"):
        module.setup("test")
    (folder / "test").mkdir()
    with pytest.raises(ValueError, match=rf"^PG-19 folder '{re.escape(str(folder / 'test'))}' holds no \.txt books\.$"):
        module.setup("test")


def test_an_intact_pg19_slice_sets_up_its_train_and_validation_splits(tmp_path):
    module = _data_module(_pg19_slice(tmp_path / "pg19"), tmp_path / "cache")
    module.setup("fit")
    assert len(module.train_streams) > 0
    assert len(list((tmp_path / "cache" / "splits").iterdir())) == 2  # train and validation, tokenised at set-up


# ---------------------------------------------------------------------------------------- not UTF-8


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_book_that_is_not_utf8_is_refused_naming_the_file_and_byte_offset(tmp_path, split):
    folder = _pg19_slice(tmp_path / "pg19")
    book = sorted((folder / split).glob("*.txt"))[0]
    offset = _inject(book, b"\xff\xfe")
    module = _data_module(folder, tmp_path / "cache")
    message = rf"^PG-19 book '{re.escape(str(book))}' is not valid UTF-8 at byte offset {offset}; .*'replace'.*\.$"
    with pytest.raises(ValueError, match=message):
        module.setup("fit")


def test_replace_decodes_damaged_books_and_warns_once_with_the_counts(tmp_path):
    folder = _pg19_slice(tmp_path / "pg19", train_books=3)
    damaged = sorted((folder / "train").glob("*.txt"))[:2]
    _inject(damaged[0], b"\xff\xfe\xfd")  # three bytes that start no UTF-8 sequence: three replacements
    _inject(damaged[1], b"\xc3")  # a lead byte without its continuation: one replacement
    module = _data_module(folder, tmp_path / "cache", decode_errors="replace")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup("fit")
    unicode_warnings = [w for w in caught if issubclass(w.category, UnicodeWarning)]
    assert len(unicode_warnings) == 1, [str(w.message) for w in unicode_warnings]
    assert "2 of 3 books were not valid UTF-8 and 4 characters were replaced with U+FFFD" in str(unicode_warnings[0].message)
    # the replacement characters are in the training text, and the word count is that of the decoded text
    train = module.train_split
    first_book = module.tokenizer.decode(train.tokens[: train.doc_starts[1] - 1].tolist(), clean_up_tokenization_spaces=False)
    assert first_book == damaged[0].read_bytes().decode("utf-8", errors="replace")
    assert first_book.count("\ufffd") == 3
    assert train.num_words == sum(
        len(book.read_bytes().decode("utf-8", errors="replace").split()) for book in sorted((folder / "train").glob("*.txt"))
    )
    # the replaced text is cached under its own key: a strict run on the same cache still refuses
    with pytest.raises(ValueError, match=r"is not valid UTF-8 at byte offset"):
        _data_module(folder, tmp_path / "cache").setup("fit")


def test_replace_counts_only_bad_bytes_not_replacement_characters_already_in_the_book(tmp_path):
    book = tmp_path / "1.txt"
    text = PG19Corpus.read(sorted((PG19_SAMPLE / "validation").glob("*.txt"))[0])[:5000]
    book.write_bytes(text.encode() + "\ufffd".encode() + b"\x80\x80" + text.encode())
    from longlm.data.pg19 import decode_book

    decoded, replaced = decode_book(book.read_bytes(), book, "replace")
    assert replaced == 2
    assert decoded == text + "\ufffd" * 3 + text


def test_decode_errors_takes_only_strict_or_replace(tmp_path):
    with pytest.raises(ValueError, match=r"^data\.decode_errors must be one of 'strict', 'replace', got 'ignore'\.$"):
        _data_module(_pg19_slice(tmp_path / "pg19"), tmp_path / "cache", decode_errors="ignore")


def test_decode_errors_is_a_data_option_of_the_cli_parser():
    from jsonargparse import ArgumentParser

    from longlm.training import LMDataModule

    parser = ArgumentParser()
    parser.add_class_arguments(LMDataModule, "data")
    assert parser.parse_args(["--data.decode_errors", "replace"]).data.decode_errors == "replace"
    assert parser.parse_args([]).data.decode_errors == "strict"


# ---------------------------------------------------------------------------- BPE without whitespace


def _real_text_without_whitespace(size: int = 1_000_000, letters_only: bool = False) -> str:
    books = sorted((PG19_SAMPLE / "train").glob("*.txt"))
    text = re.sub(r"\s+", "", "".join(PG19Corpus.read(book) for book in books[:3]))
    if letters_only:  # no punctuation either: the byte-level regex then sees ONE pre-token
        text = re.sub(r"[\W\d_]+", "", text)
    assert len(text) >= size
    return text[:size]


@pytest.mark.parametrize("letters_only", [False, True], ids=["no-whitespace", "letters-only"])
def test_pre_split_bounds_every_pre_token_of_a_megabyte_without_whitespace(letters_only):
    text = _real_text_without_whitespace(letters_only=letters_only)
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    pieces = byte_level_pre_tokenizer().pre_tokenize_str(text)
    longest = max(end - start for _, (start, end) in pieces)
    assert longest <= MAX_PRETOKEN_CHARS
    assert max(end - start for _, (start, end) in plain) > MAX_PRETOKEN_CHARS  # the text is a real stress case
    assert "".join(piece for piece, _ in pieces) == "".join(piece for piece, _ in plain)  # nothing lost or added


@pytest.mark.parametrize("book", sorted(PG19_SAMPLE.glob("*/*.txt")), ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_pre_split_leaves_real_books_pre_tokenized_exactly_as_byte_level(book):
    text = PG19Corpus.read(book)
    assert byte_level_pre_tokenizer().pre_tokenize_str(text) == pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)


def test_bpe_trained_on_a_megabyte_without_whitespace_round_trips_real_text(tmp_path):
    text = _real_text_without_whitespace(letters_only=True)
    tokenizer = train_bpe([text], 2000, tmp_path / "bpe")
    assert len(tokenizer) == 2000
    # the saved tokenizer keeps the pre-split: what it encodes later is bounded the same way
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert max(end - start for _, (start, end) in pieces) <= MAX_PRETOKEN_CHARS
    real = PG19Corpus.read(PG19_SAMPLE / "test" / "2701.txt")[:100_000] + PG19Corpus.read(PG19_SAMPLE / "validation" / "1342.txt")[:100_000]
    for sample in (real, text[:200_000]):
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == sample
    # the merges learnt from the run are used: far fewer tokens than characters
    assert len(tokenizer(text[:100_000], add_special_tokens=False)["input_ids"]) < 100_000 / 2


# ------------------------------------------------------------------------------- evaluation too short


def _tiny_model(vocab_size: int):
    from longlm import LongLMConfig, LongLMForCausalLM

    config = LongLMConfig.from_preset(
        "transformer-xl", vocab_size=vocab_size, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
        intermediate_size=32, mem_len=8,
    )
    return LongLMForCausalLM(config)


def _truncated_enwik8(tmp_path: Path, size: int) -> Path:
    """The first `size` bytes of the real sample: its test split is the last 5% of them."""
    path = tmp_path / "enwik8-short"
    path.write_bytes(ENWIK8_SAMPLE.read_bytes()[:size])
    return path


@pytest.mark.parametrize("tgt_len, batch_size", [(128, 1), (32, 4)])
def test_evaluation_refuses_a_split_shorter_than_one_segment_per_stream(tmp_path, tgt_len, batch_size):
    from longlm.evaluation import evaluate_stream

    split = CORPORA.get("enwik8")(_truncated_enwik8(tmp_path, 2000), cache_dir=tmp_path / "cache").split("test")
    assert len(split.tokens) == 100
    needed = batch_size * (tgt_len + 1)
    message = (
        rf"^The test split has 100 tokens, fewer than one segment per stream: {batch_size} stream\(s\) x "
        rf"\(tgt_len {tgt_len} \+ 1\) = {needed} tokens are needed; use a smaller tgt_len or batch_size, or a longer split\.$"
    )
    with pytest.raises(ValueError, match=message):
        evaluate_stream(_tiny_model(259), split, tgt_len=tgt_len, batch_size=batch_size)


def test_evaluation_of_a_split_that_fills_one_segment_scores_every_token(tmp_path):
    from longlm.evaluation import evaluate_stream

    split = CORPORA.get("enwik8")(_truncated_enwik8(tmp_path, 2000), cache_dir=tmp_path / "cache").split("test")
    result = evaluate_stream(_tiny_model(259), split, tgt_len=99, batch_size=1)
    assert result["tokens_scored"] == 99


def test_evaluation_names_a_short_pg19_split(tmp_path):
    from longlm.evaluation import evaluate_stream

    folder = _pg19_slice(tmp_path / "pg19")
    book = next((folder / "validation").glob("*.txt"))
    book.write_text(PG19Corpus.read(book)[:40], encoding="utf-8")
    corpus = CORPORA.get("pg19")(folder, cache_dir=tmp_path / "cache", vocab_size=VOCAB)
    split = corpus.split("validation")
    with pytest.raises(ValueError, match=rf"^The validation split has {len(split.tokens)} tokens, fewer than one segment per stream"):
        evaluate_stream(_tiny_model(VOCAB), split, tgt_len=64, batch_size=1)


def test_evaluate_script_refuses_a_short_split_instead_of_printing_a_bpc(tmp_path):
    from transformers import ByT5Tokenizer

    model_dir = tmp_path / "model"
    _tiny_model(259).save_pretrained(model_dir)
    ByT5Tokenizer(extra_ids=0).save_pretrained(model_dir)
    short = _truncated_enwik8(tmp_path, 2000)
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(model_dir), "--dataset", "enwik8", "--path", str(short),
         "--split", "test", "--tgt-len", "128", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert run.returncode != 0
    assert "bits_per_character" not in run.stdout
    assert "The test split has 100 tokens, fewer than one segment per stream" in run.stderr


# ------------------------------------------------------------------------------------------ QA files


def _squad_dev_doc() -> dict:
    return json.loads(SQUAD2_DEV.read_text(encoding="utf-8"))


def _write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@requires_qa_data
@pytest.mark.parametrize("emptied", ["data", "paragraphs", "qas"])
def test_qa_file_without_examples_is_refused(tmp_path, emptied):
    doc = _squad_dev_doc()
    if emptied == "data":
        doc["data"] = []
    for article in doc["data"]:
        if emptied == "paragraphs":
            article["paragraphs"] = []
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = []
    path = _write_json(tmp_path / "empty.json", doc)
    message = rf"^QA file '{re.escape(str(path))}' holds no examples; expected at least one question with its context\.$"
    for load in (load_qa_examples, load_squad):
        with pytest.raises(ValueError, match=message):
            load(path)


@requires_qa_data
@pytest.mark.parametrize("blank", ["", "   \n\t"])
def test_qa_example_with_an_empty_question_is_refused_naming_its_id(tmp_path, blank):
    doc = _squad_dev_doc()
    qa = doc["data"][0]["paragraphs"][1]["qas"][2]
    qa["question"] = blank
    path = _write_json(tmp_path / "blank.json", copy.deepcopy(doc))
    message = rf"^QA file '{re.escape(str(path))}': question '{qa['id']}' has an empty or whitespace-only question text\.$"
    with pytest.raises(ValueError, match=message):
        load_qa_examples(path)


@requires_qa_data
def test_qa_file_that_is_binary_is_refused_naming_the_file(tmp_path):
    compressed = tmp_path / "squad2-dev.json"  # a gzip saved under the JSON name: not UTF-8 at byte 1
    compressed.write_bytes(gzip.compress(SQUAD2_DEV.read_bytes()))
    message = rf"^QA file '{re.escape(str(compressed))}' is not UTF-8 text \(byte 1 cannot be decoded\); expected a SQuAD or TriviaQA JSON file\.$"
    with pytest.raises(ValueError, match=message):
        load_qa_examples(compressed)
    zeros = tmp_path / "zeros.json"  # valid UTF-8 but no JSON
    zeros.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=rf"^QA file '{re.escape(str(zeros))}' is not valid JSON: .* at line 1, column 1\.$"):
        load_qa_examples(zeros)


@requires_qa_data
@pytest.mark.parametrize("field", ["max_train_examples", "max_eval_examples"])
def test_qa_data_module_refuses_a_limit_that_keeps_no_examples(field):
    from longlm.training.qa_datamodule import QADataModule

    with pytest.raises(ValueError, match=rf"^data\.{field} must be a positive integer or null \(all examples\), got 0\.$"):
        QADataModule(str(SQUAD2_DEV), str(SQUAD2_DEV), **{field: 0})
    assert QADataModule(str(SQUAD2_DEV), **{field: 3}).hparams[field] == 3
