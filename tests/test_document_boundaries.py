"""Memory forgets exactly where a document ends, for every preset: on real PG-19 book boundaries that fall
inside a segment, replacing every token of the earlier book changes nothing (exactly) at or after the
boundary — in that segment (the mask is block-diagonal by document) and in every later one (nothing from
before the start is written to the next state) — with two rows whose boundaries differ."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longlm import LongLMForCausalLM
from tests.paths import PG19_VOCAB as VOCAB
from tests.paths import requires_shared_data
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config

SEG_LEN = 32  # long enough for bigbird's sparse block plan (not its dense fallback) at block_size 4
SEGMENTS = 4
# where each row's real book boundary falls in its stream: inside segment 1 and inside segment 2
OFFSETS = (SEG_LEN + 13, 2 * SEG_LEN + 21)


@pytest.fixture(scope="module")
def streams(pg19_train):
    """(original, changed, document_starts): two rows of real PG-19 text around two real book boundaries;
    `changed` replaces every token before each row's boundary with other real text of the sample."""
    split = pg19_train
    tokens, starts = np.asarray(split.tokens), [int(s) for s in split.doc_starts]
    assert len(starts) >= 4, "the PG-19 sample holds at least four books"
    length = SEG_LEN * SEGMENTS
    original, changed = [], []
    document_starts = torch.zeros(len(OFFSETS), length, dtype=torch.bool)
    for row, offset in enumerate(OFFSETS):
        boundary = starts[row + 1]
        stream = tokens[boundary - offset : boundary - offset + length].copy()
        other = tokens[starts[3] + 1000 + row * length : starts[3] + 1000 + row * length + offset]  # a later book's text
        assert not np.array_equal(other, stream[:offset])
        swapped = stream.copy()
        swapped[:offset] = other
        original.append(stream)
        changed.append(swapped)
        document_starts[row, offset] = True
    as_ids = lambda rows: torch.from_numpy(np.stack(rows)).long()  # noqa: E731
    return as_ids(original), as_ids(changed), document_starts


def _model(name: str) -> LongLMForCausalLM:
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config(name, vocab_size=VOCAB, initializer_range=0.1))
    return model.double()


def _segment_logits(model: LongLMForCausalLM, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(B, SEGMENTS * SEG_LEN, V): the segments in order, each reading the memory the one before wrote."""
    memory, logits = None, []
    for index in range(SEGMENTS):
        part = slice(index * SEG_LEN, (index + 1) * SEG_LEN)
        out = model(ids[:, part], memory=memory, document_starts=starts[:, part])
        memory = out.memory
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def _assert_nothing_crosses(original: torch.Tensor, changed: torch.Tensor, name: str) -> None:
    for row, offset in enumerate(OFFSETS):
        diff = (original[row, offset:] - changed[row, offset:]).abs().max().item()
        assert diff == 0.0, f"{name}: row {row} after its book boundary differs by {diff:.3g}"
        assert not torch.equal(original[row, :offset], changed[row, :offset]), f"{name}: the earlier book was not changed"


@requires_shared_data
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_changing_the_earlier_book_changes_nothing_after_the_boundary(name, streams):
    original, changed, starts = streams
    model = _model(name).eval()
    with torch.no_grad():
        _assert_nothing_crosses(_segment_logits(model, original, starts), _segment_logits(model, changed, starts), name)


@requires_shared_data
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_in_training_mode_too(name, streams):
    """Training runs the same masks and memory writes (dropout is off here so the two runs can be compared;
    each run starts from the same weights and buffers, since training updates some, e.g. routing's centroids)."""
    original, changed, starts = streams
    state = _model(name).state_dict()
    runs = []
    for ids in (original, changed):
        model = _model(name)
        model.load_state_dict(state)
        model.train()
        with torch.no_grad():
            runs.append(_segment_logits(model, ids, starts))
    if name == "routing":  # its k-means centroids are trained on every token of a segment, both books alike
        for row, offset in enumerate(OFFSETS):
            first = (offset // SEG_LEN + 1) * SEG_LEN  # to the end of the boundary's segment: before any update counts
            assert (runs[0][row, offset:first] - runs[1][row, offset:first]).abs().max().item() == 0.0
        return
    _assert_nothing_crosses(*runs, name)


@requires_shared_data
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_generate_after_a_prompt_holding_a_boundary_ignores_the_earlier_book(name, streams):
    original, changed, starts = streams
    model = _model(name).eval()
    cut = OFFSETS[0] + 7  # the prompt ends 7 tokens into the second book of row 0
    outputs = []
    for ids in (original, changed):
        with torch.no_grad():
            generated = model.generate(
                ids[:1, :cut], document_starts=starts[:1, :cut], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )
        outputs.append(torch.stack(generated.logits, dim=1))
    assert (outputs[0] - outputs[1]).abs().max().item() == 0.0, name


@requires_shared_data
def test_dilated_heads_keep_to_their_document_too(streams):
    """Longformer with per-head dilation (its paper's upper layers): every dilation group masks by document."""
    original, changed, starts = streams
    torch.manual_seed(0)
    config = tiny_preset_config("longformer", vocab_size=VOCAB, initializer_range=0.1, attention_dilation=[1, 1, 2, 2])
    model = LongLMForCausalLM(config).double().eval()
    with torch.no_grad():
        _assert_nothing_crosses(_segment_logits(model, original, starts), _segment_logits(model, changed, starts), "dilated")
