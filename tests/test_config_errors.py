"""Bad configuration input fails early with one clear sentence that names the field."""
from __future__ import annotations

import re

import pytest

from longlm import LongLMConfig, LongLMForCausalLM
from longlm.presets import PRESETS
from tests.sentences import assert_one_sentence, raises_naming


def _one_sentence(message: str) -> None:
    assert_one_sentence(message)


def _raises(match_words, build, error=ValueError):
    return raises_naming(build, *match_words, error=error)


def test_unknown_preset_lists_valid_ones():
    message = _raises(["preset", "'no-such-recipe'"], lambda: LongLMConfig.from_preset("no-such-recipe"))
    for name in PRESETS.names():
        assert name in message
    assert {"transformer-xl", "full"} <= set(PRESETS.names())


def test_unknown_mixer():
    message = _raises(["mixer", "'attn'"], lambda: LongLMConfig(mixer="attn"))
    assert "relative" in message and "full" in message


def test_unknown_mixer_inside_a_per_layer_list():
    _raises(["mixer", "'attn'"], lambda: LongLMConfig(num_hidden_layers=2, mixer=["relative", "attn"]))


def test_unknown_memory():
    message = _raises(["memory", "'lstm'"], lambda: LongLMConfig(memory="lstm"))
    assert "xl" in message and "none" in message


def test_hidden_size_not_divisible_by_heads():
    _raises(["hidden_size", "num_attention_heads", "65", "4"], lambda: LongLMConfig(hidden_size=65, num_attention_heads=4))


@pytest.mark.parametrize("build", [lambda: LongLMConfig(mem_len=-1), lambda: LongLMConfig.from_preset("transformer-xl", mem_len=-1)])
def test_negative_mem_len(build):
    _raises(["mem_len", "-1"], build)


def test_zero_layers():
    _raises(["num_hidden_layers", "0"], lambda: LongLMConfig(num_hidden_layers=0))


def test_mixer_list_length_mismatch():
    message = _raises(
        ["mixer", "num_hidden_layers"], lambda: LongLMConfig(num_hidden_layers=3, mixer=["relative", "full"])
    )
    assert re.search(r"\b2\b", message) and re.search(r"\b3\b", message)


def test_unknown_position_embedding_type():
    _raises(["position_embedding_type", "'alibi'"], lambda: LongLMConfig(position_embedding_type="alibi"))


def test_bad_dropout_and_clamp_len():
    _raises(["hidden_dropout_prob"], lambda: LongLMConfig(hidden_dropout_prob=1.5))
    _raises(["clamp_len"], lambda: LongLMConfig(clamp_len=0))


def test_valid_configs_build():
    """The checks above must not reject good input."""
    config = LongLMConfig(num_hidden_layers=2, mixer=["relative", "full"], memory="xl", mem_len=0)
    assert config.mixers == ["relative", "full"]
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert LongLMConfig.from_preset("transformer-xl", mem_len=7).mem_len == 7


def test_from_pretrained_on_folder_without_config(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    message = _raises([str(folder), "config.json"], lambda: LongLMForCausalLM.from_pretrained(folder), FileNotFoundError)
    assert message.startswith("Model folder")


def test_attention_bias_with_a_mixer_without_biases():
    message = _raises(["attention_bias", "'relative'"], lambda: LongLMConfig.from_preset("transformer-xl", attention_bias=True))
    assert "'full'" not in message


@pytest.mark.parametrize("field", ["position_offset", "type_vocab_size"])
def test_negative_embedding_fields(field):
    _raises([field], lambda: LongLMConfig(**{field: -1}))


def test_sequence_longer_than_the_absolute_position_table():
    import torch

    config = LongLMConfig(
        mixer="full", num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, memory="none",
        position_embedding_type="absolute", max_position_embeddings=12, position_offset=2,
    )
    model = LongLMForCausalLM(config)
    model(input_ids=torch.zeros(1, 10, dtype=torch.long))  # positions 2..11 fit
    _raises(["11 tokens", "max_position_embeddings=12", "position_offset=2"], lambda: model(input_ids=torch.zeros(1, 11, dtype=torch.long)))
