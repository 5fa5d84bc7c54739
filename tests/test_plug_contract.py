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
from longlm.attention.base import TokenMixer as MIXER_BASE
from longlm.configuration_longlm import mechanism_options
from longlm.memory import MEMORIES
from longlm.memory.base import SegmentMemory as MEMORY_BASE
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.remote_code_check import run_remote_many
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


class _OnlyTheKernelChoice:
    """Stands in for a mixer's config after construction: the attention implementation is the one field a
    forward may read (Hugging Face reads `_attn_implementation` per call); any other read fails the test."""

    def __init__(self, config: LongLMConfig) -> None:
        self._attn_implementation = config._attn_implementation

    def __getattr__(self, name: str):
        raise AssertionError(f"a mixer read config.{name} during a forward; it should read it at construction")


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_mixers_and_memories_read_no_config_field_during_a_forward(name):
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config(name))
    ids = torch.randint(3, 200, (2, 8))
    mixers = [module for module in model.modules() if isinstance(module, MIXER_BASE)]
    assert len(mixers) == model.config.num_hidden_layers
    assert not any(hasattr(module, "config") for module in model.modules() if isinstance(module, MEMORY_BASE))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        for mixer in mixers:
            mixer.config = _OnlyTheKernelChoice(model.config)
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
        first = model(ids[:, :5], use_cache=True)
        model(ids[:, 5:6], memory=first.memory, use_cache=True)  # a generation step reads nothing either
    model.train()
    model(ids, labels=ids).loss.backward()  # nor does a training step


def test_retrieval_settings_change_through_with_memory_only():
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config("memorizing")).eval()
    knn_mixers = [m for m in model.modules() if isinstance(m, MIXERS.get("knn"))]
    model.with_memory(knn_top_k=2)
    assert model.config.knn_top_k == 2 and all(mixer.top_k == 2 for mixer in knn_mixers)
    raises_naming(lambda: model.with_memory(knn_top_k=10_000), "knn_top_k", "knn_memory_size")
    assert all(mixer.top_k == 2 for mixer in knn_mixers)
    model.config.knn_top_k = 3
    raises_naming(lambda: model(torch.randint(3, 200, (1, 6))), "config.knn_top_k", "with_memory(knn_top_k=3)")


def test_a_per_layer_mixer_list_moves_to_layer_mixers():
    """Before `layer_mixers`, `mixer` itself could list one name per layer (saved config.json files hold it)."""
    config = LongLMConfig(num_hidden_layers=2, mixer=["relative", "full"], memory="xl", mem_len=4)
    assert config.mixer == "relative" and config.layer_mixers == ["relative", "full"]
    assert LongLMConfig.from_dict(config.to_dict()).mixers == ["relative", "full"]
    legacy = LongLMConfig(num_hidden_layers=2, mixer=["relative", "relative"], memory="knn", knn_layers=[1], mem_len=4)
    assert legacy.layer_mixers == ["relative", "knn"]
    raises_naming(
        lambda: LongLMConfig(num_hidden_layers=2, mixer=["relative", "full"], layer_mixers=["full", "full"]),
        "mixer=['relative', 'full']", "layer_mixers",
    )


def test_every_preset_loads_as_remote_code_from_its_discovered_modules(tmp_path):
    """The registry packages find their mechanisms by listing their folder (`import_mechanisms`); a saved
    folder's flat copy has the imports written out, so every preset, the ones no `__init__` names included,
    loads with trust_remote_code where longlm cannot be imported, with identical logits over two segments."""
    folders, segments, expected = [], [], []
    for name in PRESET_NAMES:
        torch.manual_seed(0)
        model = LongLMForCausalLM(tiny_preset_config(name)).eval()
        ids = [torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]
        with torch.no_grad():
            first = model(ids[0])
            expected.append([first.logits, model(ids[1], memory=first.memory).logits])
        folder = tmp_path / name
        model.save_pretrained(folder)
        folders.append(folder)
        segments.append(ids)
    for package in ("attention", "memory"):
        assert "infini" not in (Path(__file__).parents[1] / "longlm" / package / "__init__.py").read_text()
    for name, output, logits in zip(PRESET_NAMES, run_remote_many(folders, segments, tmp_path), expected):
        for remote, local in zip(output["logits"], logits):
            torch.testing.assert_close(remote, local, rtol=0, atol=0, msg=name)
