"""A byte-level BPE tokenizer trained with `tokenizers` and wrapped as a HF fast tokenizer (cached).

BPE training costs, per merge, the length of every pre-token holding the merged pair, so one huge
pre-token (a book without whitespace is a single "word" to the byte-level regex) makes training quadratic
in its size. Runs of more than `MAX_PRETOKEN_CHARS` non-whitespace (or whitespace) characters are therefore
cut into pieces of at most that many characters before the byte-level split; ordinary text, whose
pre-tokens are words far shorter than that, is pre-tokenized exactly as before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in the byte tokenizer
MAX_PRETOKEN_CHARS = 128  # longest pre-token: bounds training time; real PG-19 words are under 30


def byte_level_pre_tokenizer(max_chars: int = MAX_PRETOKEN_CHARS):
    """Cut runs longer than `max_chars` into `max_chars` pieces, then GPT-2's byte-level split, so that no
    pre-token is longer than `max_chars` characters whatever the text."""
    from tokenizers import Regex, pre_tokenizers

    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}.")
    runs = pre_tokenizers.Split(Regex(rf"\S{{{max_chars}}}|\s{{{max_chars}}}"), behavior="isolated")
    return pre_tokenizers.Sequence([runs, pre_tokenizers.ByteLevel(add_prefix_space=False)])


def train_bpe(texts: Iterable[str], vocab_size: int, folder: Path):
    """Train (or load from `folder`) a byte-level BPE of `vocab_size` pieces; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tmp = folder.with_name(folder.name + ".tmp")
    fast.save_pretrained(str(tmp))
    tmp.rename(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
