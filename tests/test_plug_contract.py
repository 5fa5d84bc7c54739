"""The plug contract between the skeleton, the mixers and the memories: options owned by the mechanisms,
explicit writes from mixer to memory, memory settings changed only through `with_memory`, and folders saved
before the contract changed still loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longlm import LongLMConfig, LongLMForCausalLM
from longlm.attention import MIXERS
from longlm.configuration_longlm import mechanism_options
from longlm.memory import MEMORIES
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.sentences import raises_naming

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["memorizing", "routing"])
def test_a_folder_saved_before_layer_mixers_loads_and_gives_the_same_logits(name):
    """Saved by commit 6aa3049 (per-mixer `knn_layers` / `routing_layers` keys, all options as fields)."""
    folder = FIXTURES / f"saved-6aa3049-{name}"
    model = LongLMForCausalLM.from_pretrained(folder).eval()
    expected = load_file(folder / "expected.safetensors")
    assert model.config.mixers[1] == ("knn" if name == "memorizing" else "routing")
    with torch.no_grad():
        first = model(expected["input_ids"])
        second = model(expected["input_ids"], memory=first.memory)
    torch.testing.assert_close(first.logits, expected["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(second.logits, expected["logits_second_segment"], rtol=0, atol=1e-6)


def test_every_option_is_owned_by_the_mechanism_that_reads_it():
    owners = {}
    for registry in (MIXERS, MEMORIES):
        for name in registry.names():
            for option in getattr(registry.get(name), "options", {}):
                owners.setdefault(option, []).append(name)
    assert set(owners) == set(mechanism_options())
    assert owners["attention_window"] == ["routing", "sliding"]  # shared, declared once (windowed.ATTENTION_WINDOW)
    assert owners["cmem_len"] == ["compressive"] and owners["num_memory_tokens"] == ["rmt"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_each_layer_writes_what_its_memory_reads(name):
    """The skeleton hands the memory one write per layer: exactly the layers whose memory asks for one get a write
    of the declared type, the others None."""
    config = tiny_preset_config(name)
    model = LongLMForCausalLM(config).eval()
    memory = MEMORIES.get(config.memory)
    seen = {}

    def spy(state, segment):
        seen["writes"] = list(segment.writes)
        return original(state, segment)

    original = model.model.memory.update
    model.model.memory.update = spy
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 8)))
    for index, write in enumerate(seen["writes"]):
        needed = memory.required_write(config, index)
        declared = MIXERS.get(config.mixers[index]).writes
        assert (write is None) == (declared is None) or config.reversible
        if needed is not None:
            assert isinstance(write, needed)


def _xl(**overrides) -> LongLMForCausalLM:
    torch.manual_seed(0)
    return LongLMForCausalLM(tiny_preset_config("transformer-xl", mem_len=4, **overrides)).eval()


def test_with_memory_reconfigures_every_layer_and_validates():
    model = _xl()
    ids = torch.randint(3, 200, (1, 6))
    with torch.no_grad():
        assert model(ids).memory.hidden[0].shape[1] == 4
        model.with_memory(mem_len=12, same_length=True)
        assert model(ids).memory.hidden[0].shape[1] == 6 and model.config.mem_len == 12
        assert all(layer.block.mixer.same_length_window == 12 for layer in model.model.layers)
        longer = model(ids, memory=model(ids).memory).memory.hidden[0].shape[1]
    assert longer == 12
    raises_naming(lambda: model.with_memory(mem_len=-1), "mem_len", "non-negative")
    assert model.config.mem_len == 12 and model.model.memory.mem_len == 12  # a refused change changes nothing
    raises_naming(lambda: model.with_memory(hidden_size=8), "hidden_size", "mem_len")


def test_changing_the_config_behind_the_layers_back_is_refused():
    model = _xl()
    model.config.mem_len = 64
    raises_naming(lambda: model(torch.randint(3, 200, (1, 6))), "config.mem_len", "with_memory(mem_len=64)")


def test_a_compressed_memory_cannot_be_added_after_construction():
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config("compressive", cmem_len=0)).eval()
    raises_naming(lambda: model.with_memory(cmem_len=8, compression_rate=4), "compression_rate")
    raises_naming(lambda: model.with_memory(cmem_len=8), "cmem_len=8", "cmem_len=0")
    assert model.model.memory.cmem_len == 0 and model.config.cmem_len == 0
    model(torch.randint(3, 200, (1, 6)))  # still consistent: runs


def test_unknown_and_mismatched_options_are_refused():
    raises_naming(lambda: LongLMConfig(num_hidden_layers=2, attention_windw=8), "attention_windw", "attention_window", endings=("?",))
    raises_naming(lambda: LongLMConfig(num_hidden_layers=2, block_size=0), "block_size", "positive integer")
    raises_naming(
        lambda: LongLMConfig(num_hidden_layers=2, mixer="full", memory="knn", layer_mixers=["full", "full"]),
        "knn layer",
    )


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_projections_are_handed_over_only_to_a_memory_that_reads_them(name):
    config = tiny_preset_config(name)
    model = LongLMForCausalLM(config).eval()
    seen = {}
    original = model.model.memory.update

    def spy(state, segment):
        seen["projections"] = list(segment.projections)
        return original(state, segment)

    model.model.memory.update = spy
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 8)))
    if MEMORIES.get(config.memory).needs_projections(config):
        assert len(seen["projections"]) == config.num_hidden_layers and all(p is not None for p in seen["projections"])
    else:
        assert seen["projections"] == []
