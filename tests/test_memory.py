"""Segment memory: what `xl` stores, that it is detached, resets, and that carrying it is exact."""
from __future__ import annotations

import pytest
import torch

from longlm import LongLMForCausalLM
from longlm.memory.xl import XLMemoryState

SEG = 6


def _model(config) -> LongLMForCausalLM:
    config.initializer_range = 0.1  # large enough that attention is far from uniform
    return LongLMForCausalLM(config).double().eval()


def _ids(config, *shape):
    return torch.randint(2, config.vocab_size, shape)


@pytest.mark.parametrize("mem_len", [4, 16])
def test_xl_memory_holds_last_mem_len_layer_inputs(tiny_config, mem_len):
    config = tiny_config(mem_len=mem_len)
    model = _model(config)
    memory, seen = None, [[] for _ in range(config.num_hidden_layers)]
    with torch.no_grad():
        for n in range(1, 5):
            out = model(_ids(config, 2, SEG), memory=memory, output_hidden_states=True)
            assert len(out.hidden_states) == config.num_hidden_layers + 1
            memory = out.memory
            assert isinstance(memory, XLMemoryState)
            for layer, states in enumerate(seen):
                states.append(out.hidden_states[layer])  # the input of `layer` in this segment
                expected = torch.cat(states, dim=1)[:, -mem_len:]
                assert memory.hidden[layer].shape == (2, min(mem_len, n * SEG), config.hidden_size)
                torch.testing.assert_close(memory.hidden[layer], expected, rtol=0, atol=0)
            assert memory.valid.shape == (2, min(mem_len, n * SEG)) and bool(memory.valid.all())
            assert memory.num_tokens == n * SEG
    # the stored inputs differ per layer (layer 1's input is layer 0's output, not the embeddings)
    assert not torch.allclose(memory.hidden[0], memory.hidden[1])


def test_xl_memory_is_detached(tiny_config):
    config = tiny_config(hidden_dropout_prob=0.1)
    model = _model(config).train()
    embeds = model.get_input_embeddings()(_ids(config, 2, SEG)).detach().requires_grad_(True)
    first = model(inputs_embeds=embeds)
    memory = first.memory
    for h in memory.hidden:
        assert not h.requires_grad and h.grad_fn is None
    assert not memory.valid.requires_grad
    second = model(_ids(config, 2, SEG), memory=memory, labels=_ids(config, 2, SEG))
    (grad,) = torch.autograd.grad(second.loss, embeds, allow_unused=True)
    assert grad is None  # no gradient crosses the segment boundary
    # ... while the second segment does depend on the first through the memory
    with torch.no_grad():
        model.eval()
        ids = _ids(config, 2, SEG)
        assert not torch.allclose(model(ids, memory=model(inputs_embeds=embeds).memory).logits, model(ids).logits)


def test_mem_len_zero_gives_empty_memory(tiny_config):
    config = tiny_config(mem_len=0)
    model = _model(config)
    ids_a, ids_b = _ids(config, 2, SEG), _ids(config, 2, SEG)
    with torch.no_grad():
        memory = model(ids_a).memory
        assert all(h.shape == (2, 0, config.hidden_size) for h in memory.hidden)
        assert len(memory.hidden) == config.num_hidden_layers
        assert memory.valid.shape == (2, 0) and memory.length == 0
        next_memory = model(ids_b, memory=memory).memory
        assert next_memory.length == 0 and next_memory.num_tokens == 2 * SEG
        torch.testing.assert_close(model(ids_b, memory=memory).logits, model(ids_b).logits, rtol=0, atol=0)


def test_reset_rows(tiny_config):
    config = tiny_config()
    model = _model(config)
    ids_a, ids_b, ids_c = (_ids(config, 2, SEG) for _ in range(3))
    rows = torch.tensor([True, False])
    with torch.no_grad():
        memory = model(ids_a).memory
        reset = memory.reset_rows(rows)
        assert reset.num_tokens == memory.num_tokens
        assert not bool(reset.valid[0].any()) and bool(reset.valid[1].all())
        out_reset = model(ids_b, memory=reset)
        out_kept = model(ids_b, memory=memory)
        fresh = model(ids_b)
        torch.testing.assert_close(out_reset.logits[0], fresh.logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_reset.logits[1], out_kept.logits[1], rtol=0, atol=0)
        assert not torch.allclose(out_reset.logits[0], out_kept.logits[0])
        # one segment later, row 0 still behaves as if its stream started at B
        after_reset = model(ids_c, memory=out_reset.memory).logits[0]
        after_fresh = model(ids_c[:1], memory=model(ids_b[:1]).memory).logits[0]
        torch.testing.assert_close(after_reset, after_fresh, rtol=1e-10, atol=1e-10)
    # the original state is not modified in place
    assert bool(memory.valid.all())


def _segments_vs_concatenated(model, segments):
    memory, logits = None, None
    with torch.no_grad():
        for ids in segments:
            out = model(ids, memory=memory)
            memory, logits = out.memory, out.logits
        whole = model(torch.cat(segments, dim=1)).logits[:, -segments[-1].shape[1] :]
    return logits, whole


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("transformer-xl", {}),  # post-norm, relative positions
        ("transformer-xl", {"clamp_len": 5}),
        ("full", {"memory": "xl"}),  # pre-norm, rotary over [memory; segment]
    ],
)
def test_memory_carried_across_segments_equals_one_forward(tiny_config, preset, overrides):
    config = tiny_config(preset, mem_len=2 * SEG, **overrides)
    model = _model(config)
    a, b, c = (_ids(config, 2, SEG) for _ in range(3))
    # memory holds all of A (mem_len >= len(A)): B's logits are those of the one forward over A+B
    logits, whole = _segments_vs_concatenated(model, [a, b])
    torch.testing.assert_close(logits, whole, rtol=1e-10, atol=1e-10)
    # and with A, B both in memory, C's logits are those of A+B+C
    logits, whole = _segments_vs_concatenated(model, [a, b, c])
    torch.testing.assert_close(logits, whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset, overrides", [("transformer-xl", {}), ("full", {"memory": "xl"})])
def test_memory_shorter_than_previous_segment_is_not_exact(tiny_config, preset, overrides):
    """With mem_len < len(A) the early tokens of A are out of reach, so the two runs must differ
    (shows the equality above is not vacuous)."""
    config = tiny_config(preset, mem_len=SEG // 2, **overrides)
    model = _model(config)
    logits, whole = _segments_vs_concatenated(model, [_ids(config, 2, SEG), _ids(config, 2, SEG)])
    assert (logits - whole).abs().max() > 1e-6


def test_padding_in_previous_segment_is_masked_in_memory(tiny_config):
    """Left padding of A (attention_mask 0) is marked invalid in memory: row 0 then behaves exactly as if
    its stream had started with the unpadded part of A."""
    config = tiny_config()
    model = _model(config)
    a, b = _ids(config, 2, SEG), _ids(config, 2, SEG)
    pad = 2
    attention_mask = torch.ones(2, SEG, dtype=torch.long)
    attention_mask[0, :pad] = 0
    with torch.no_grad():
        memory = model(a, attention_mask=attention_mask).memory
        assert memory.valid[0].tolist() == [False] * pad + [True] * (SEG - pad)
        padded = model(b, memory=memory).logits
        unpadded = model(b[:1], memory=model(a[:1, pad:]).memory).logits
        full_row = model(b[1:], memory=model(a[1:]).memory).logits
    torch.testing.assert_close(padded[:1], unpadded, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(padded[1:], full_row, rtol=1e-10, atol=1e-10)


def test_memory_state_round_trips_and_selects_rows(tiny_config, tmp_path):
    config = tiny_config()
    model = _model(config)
    a, b = _ids(config, 3, SEG), _ids(config, 3, SEG)
    with torch.no_grad():
        memory = model(a).memory
        torch.save(memory.to_dict(), tmp_path / "memory.pt")
        restored = model.model.memory.state_from_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
        assert restored.num_tokens == memory.num_tokens
        torch.testing.assert_close(model(b, memory=restored).logits, model(b, memory=memory).logits, rtol=0, atol=0)
        index = torch.tensor([2, 0])
        selected = memory.select_rows(index)
        torch.testing.assert_close(
            model(b[index], memory=selected).logits, model(b, memory=memory).logits[index], rtol=1e-10, atol=1e-10
        )


def test_memory_owns_exactly_mem_len_rows_and_skips_masking_only_when_known_valid(tiny_config):
    """No slice of a larger buffer is kept alive, and the host-side validity flag follows resets."""
    config = tiny_config(mem_len=6)
    model = LongLMForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 10))
    with torch.no_grad():
        memory = model(ids).memory
        for layer_memory in memory.hidden:
            assert layer_memory.shape[1] == 6
            assert layer_memory.untyped_storage().nbytes() == layer_memory.numel() * layer_memory.element_size()
        assert memory.fully_valid and model.model.memory.known_valid_mask(memory) is None
        reset = memory.reset_rows(torch.tensor([True, False]))
        assert not reset.fully_valid
        assert model.model.memory.known_valid_mask(reset)[0].sum() == 0
        short = model(ids[:, :3], memory=reset).memory  # 3 of the 6 slots still hold reset rows
        assert not short.fully_valid and short.valid[0].tolist() == [False] * 3 + [True] * 3
        full = model(ids[:, :6], memory=short).memory  # every old slot scrolled out
        assert full.fully_valid and bool(full.valid.all())


@pytest.mark.parametrize("name", ["transformer-xl", "memorizing"])
@pytest.mark.parametrize("start", [1, 5, 11])
def test_state_after_a_document_start_inside_the_segment_holds_nothing_from_before_it(name, start):
    """The XL cache written after a segment keeps valid only the slots at or after the row's last document
    start (row 0 starts a document at `start`; row 1 has no start and keeps everything)."""
    from tests.presets_tiny import tiny_preset_config

    model = LongLMForCausalLM(tiny_preset_config(name, mem_len=16)).eval()
    earlier, segment = torch.randint(3, 200, (2, 12)), torch.randint(3, 200, (2, 12))
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[0, start] = True
    with torch.no_grad():
        memory = model(earlier).memory
        after = model(segment, memory=memory, document_starts=starts).memory
    # 16 slots = the last 4 of `earlier` and the 12 of `segment`: row 0 keeps positions start..11 of the segment
    expected_row0 = torch.tensor([False] * 4 + [i >= start for i in range(12)])
    assert torch.equal(after.valid[0].cpu(), expected_row0)
    assert bool(after.valid[1].all()) and not after.fully_valid
