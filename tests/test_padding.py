"""Padding changes nothing, for every preset: a left- or right-padded row of a batch gives, at its real
tokens, what the row alone gives (positions, blocks, buckets, chunks and memory tokens counted from its
first real token), and writes the same memory, so the next segments agree too. A preset whose pattern
cannot be made padding-invariant refuses padded input in one sentence instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longlm import LongLMForCausalLM
from tests.paths import PG19_VOCAB, requires_shared_data
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.sentences import assert_one_sentence

SEG_LEN = 32
SHORT = 19  # the padded row's real tokens in its first segment
REFUSES_PADDING = {"compressive"}  # blocks are cut at fixed positions of each row's stream


def _model(name: str) -> LongLMForCausalLM:
    return LongLMForCausalLM(tiny_preset_config(name, vocab_size=PG19_VOCAB, initializer_range=0.1)).eval()


def _rows(pg19_train) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of real text, 3 segments each, from different books."""
    tokens, starts = np.asarray(pg19_train.tokens), [int(s) for s in pg19_train.doc_starts]
    take = lambda begin: torch.from_numpy(tokens[begin : begin + 3 * SEG_LEN].astype(np.int64))  # noqa: E731
    return take(starts[1] + 500), take(starts[2] + 500)


def _padded(first: torch.Tensor, other: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of [first padded to SEG_LEN on `side`, other] and its attention mask."""
    pad = SEG_LEN - first.shape[0]
    ids = torch.zeros(2, SEG_LEN, dtype=torch.long)
    mask = torch.zeros(2, SEG_LEN, dtype=torch.long)
    real = slice(pad, SEG_LEN) if side == "left" else slice(0, first.shape[0])
    ids[0, real], mask[0, real] = first, 1
    ids[1], mask[1] = other, 1
    return ids, mask


@requires_shared_data
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(set(PRESET_NAMES) - REFUSES_PADDING))
def test_a_padded_row_gives_what_the_row_alone_gives_now_and_in_the_next_segments(name, side, pg19_train):
    model = _model(name)
    row, other = _rows(pg19_train)
    ids, mask = _padded(row[:SHORT], other[:SEG_LEN], side)
    real = slice(SEG_LEN - SHORT, SEG_LEN) if side == "left" else slice(0, SHORT)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(row[None, :SHORT])
        torch.testing.assert_close(batched.logits[0, real], alone.logits[0], rtol=0, atol=1e-5, msg=f"{name} {side}: segment 1")
        batch_memory, alone_memory = batched.memory, alone.memory
        for index in (1, 2):  # unpadded segments after it read what the padded segment wrote
            begin = SHORT + (index - 1) * SEG_LEN
            pair = torch.stack([row[begin : begin + SEG_LEN], other[index * SEG_LEN : (index + 1) * SEG_LEN]])
            batched = model(pair, memory=batch_memory)
            alone = model(pair[:1], memory=alone_memory)
            torch.testing.assert_close(
                batched.logits[0], alone.logits[0], rtol=0, atol=1e-5, msg=f"{name} {side}: segment {index + 1}"
            )
            batch_memory, alone_memory = batched.memory, alone.memory


@requires_shared_data
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(REFUSES_PADDING))
def test_a_preset_that_cannot_pad_exactly_refuses_padding_in_one_sentence(name, side, pg19_train):
    model = _model(name)
    row, other = _rows(pg19_train)
    ids, mask = _padded(row[:SHORT], other[:SEG_LEN], side)
    with pytest.raises(ValueError) as info, torch.no_grad():
        model(ids, attention_mask=mask)
    assert "padding" in str(info.value) and name in str(info.value)
    assert_one_sentence(str(info.value))


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_an_all_ones_mask_is_no_padding(name):
    """attention_mask of ones is the unpadded forward exactly (the presets that refuse padding accept it)."""
    model = _model(name)
    ids = torch.randint(3, PG19_VOCAB, (2, SEG_LEN))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits, rtol=0, atol=0)
