"""Nothing wrong passes silently: unknown config keys and values that would give NaN or crash later are
refused when the config is built, with one sentence naming the field and what was expected; what Hugging
Face itself sets on configs, and every preset, still round-trips."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from longlm import LongLMConfig, LongLMForCausalLM
from longlm.configuration_longlm import CORE_FIELD_RULES, STRUCTURED_FIELDS, mechanism_options
from longlm.presets import PRESETS
from tests.paths import ENWIK8_SAMPLE, requires_shared_data
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.sentences import assert_one_sentence, raises_naming

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)


def _one_sentence(message: str) -> None:
    assert_one_sentence(message, endings=(".", "?"))  # "did you mean 'mem_len'?" ends a sentence too


def _refused(build, *named: str) -> str:
    return raises_naming(build, *named, endings=(".", "?"))


# --------------------------------------------------------------------------------------------------
# unknown keys
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, closest",
    [("mem_length", "mem_len"), ("num_hidden_layer", "num_hidden_layers"), ("hiden_size", "hidden_size"),
     ("rope_base", "rope_theta"), ("attention_windows", "attention_window"), ("bptt", "bptt_depth")],
)
@pytest.mark.parametrize("route", ["init", "from_preset"])
def test_unknown_key_names_the_key_and_the_closest_field(route, key, closest):
    build = {
        "init": lambda: LongLMConfig(**TINY, **{key: 3}),
        "from_preset": lambda: LongLMConfig.from_preset("transformer-xl", **TINY, **{key: 3}),
    }[route]
    message = _refused(build, f"'{key}'", f"'{closest}'")
    assert message == f"Unknown LongLMConfig field '{key}'; did you mean '{closest}'?"


def test_unknown_key_without_a_close_field_lists_the_fields():
    message = _refused(lambda: LongLMConfig(zzqqxx=1), "'zzqqxx'", "'mem_len'", "'hidden_size'")
    assert "did you mean" not in message


def test_several_unknown_keys_are_all_named():
    _refused(lambda: LongLMConfig(mem_length=1, num_hidden_layer=2), "'mem_length'", "'mem_len'",
             "'num_hidden_layer'", "'num_hidden_layers'")


def test_unknown_key_in_the_training_module_config():
    """`--model.config.*` and YAML `model.config:` reach `LongLMConfig.from_preset` through the module."""
    from longlm.training import CausalLMPretraining

    _refused(lambda: CausalLMPretraining("transformer-xl", config={**TINY, "mem_length": 8}), "'mem_length'", "'mem_len'")


@requires_shared_data
@pytest.mark.parametrize("where", ["yaml", "flag"])
def test_unknown_key_from_the_command_line_or_yaml(tmp_path, where):
    from longlm.training.cli import main

    config = {**TINY, "mem_len": 8, **({"mem_length": 8} if where == "yaml" else {})}
    run = {
        "model": {"preset": "transformer-xl", "config": config},
        "data": {"dataset": "enwik8", "path": str(ENWIK8_SAMPLE), "batch_size": 2, "tgt_len": 16,
                 "eval_batch_size": 2, "eval_tgt_len": 16, "cache_dir": str(tmp_path / "cache")},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    flags = ["--model.config.mem_length", "8"] if where == "flag" else []
    _refused(lambda: main(["fit", "--config", str(path), *flags]), "'mem_length'", "'mem_len'")
    assert not (tmp_path / "checkpoints").exists()


def _saved_config(folder, **edits) -> None:
    LongLMConfig(**TINY).save_pretrained(folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edits}))


@pytest.mark.parametrize("load", [LongLMConfig.from_pretrained, LongLMForCausalLM.from_pretrained,
                                  lambda folder: LongLMConfig.from_json_file(folder / "config.json")])
def test_a_typo_in_config_json_is_refused_naming_the_file(tmp_path, load):
    LongLMForCausalLM(LongLMConfig(**TINY)).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "mem_length": 16}))
    _refused(lambda: load(tmp_path), "'mem_length'", "'mem_len'", str(path))


def test_autoconfig_refuses_a_typo_in_config_json(tmp_path):
    from transformers import AutoConfig

    _saved_config(tmp_path, num_hidden_layer=3)
    _refused(lambda: AutoConfig.from_pretrained(tmp_path), "'num_hidden_layer'", "'num_hidden_layers'")


# the kwargs transformers' own config tests pass to every config (5.x `config_common_kwargs`, then 4.x's)
HF_COMMON_KWARGS = {
    "return_dict": False, "output_hidden_states": True, "output_attentions": True, "dtype": "float16",
    "chunk_size_feed_forward": 5, "architectures": ["BertModel"], "id2label": {0: "label"},
    "label2id": {"label": "0"}, "problem_type": "regression",
}
HF4_COMMON_KWARGS = {
    "return_dict": False, "output_hidden_states": True, "output_attentions": True, "torchscript": True,
    "torch_dtype": "float16", "use_bfloat16": True, "tf_legacy_loss": True, "pruned_heads": {"a": 1},
    "tie_word_embeddings": False, "is_decoder": True, "cross_attention_hidden_size": 128,
    "add_cross_attention": True, "tie_encoder_decoder": True, "max_length": 50, "min_length": 3,
    "do_sample": True, "early_stopping": True, "num_beams": 3, "num_beam_groups": 3, "diversity_penalty": 0.5,
    "temperature": 2.0, "top_k": 10, "top_p": 0.7, "typical_p": 0.2, "repetition_penalty": 0.8,
    "length_penalty": 0.8, "no_repeat_ngram_size": 5, "encoder_no_repeat_ngram_size": 5,
    "bad_words_ids": [1, 2, 3], "num_return_sequences": 3, "chunk_size_feed_forward": 5, "output_scores": True,
    "return_dict_in_generate": True, "forced_bos_token_id": 2, "forced_eos_token_id": 3,
    "remove_invalid_values": True, "architectures": ["BertModel"], "finetuning_task": "translation",
    "id2label": {0: "label"}, "label2id": {"label": "0"}, "tokenizer_class": "BertTokenizerFast",
    "prefix": "prefix", "bos_token_id": 6, "pad_token_id": 7, "eos_token_id": 8, "sep_token_id": 9,
    "decoder_start_token_id": 10, "exponential_decay_length_penalty": (5, 1.01), "suppress_tokens": [0, 1],
    "begin_suppress_tokens": 2, "task_specific_params": {"translation": "some_params"},
    "problem_type": "regression",
}


@pytest.mark.parametrize("kwargs", [HF_COMMON_KWARGS, HF4_COMMON_KWARGS], ids=["transformers5", "transformers4"])
def test_keys_hugging_face_sets_on_configs_are_accepted(kwargs):
    config = LongLMConfig(**TINY, **kwargs)
    assert config.return_dict is False and config.output_hidden_states is True
    assert config.dtype == torch.float16 and config.id2label == {0: "label"}
    assert config.num_hidden_layers == 2  # our fields are untouched by HF's keys


@pytest.mark.parametrize("key, value", [("use_cache", False), ("name_or_path", "x"), ("num_labels", 3),
                                        ("attn_implementation", "eager"), ("auto_map", {}), ("_name_or_path", "x"),
                                        ("transformers_version", "4.40.0"), ("model_type", "longlm")])
def test_single_hugging_face_keys_are_accepted(key, value):
    LongLMConfig(**TINY, **{key: value})


# --------------------------------------------------------------------------------------------------
# bad values
# --------------------------------------------------------------------------------------------------
BAD_VALUES = [
    # a bool where an int is meant (bool is an int subclass in Python)
    ("num_hidden_layers", dict(num_hidden_layers=True)),
    ("hidden_size", dict(hidden_size=True)),
    ("mem_len", dict(mem_len=True)),
    ("clamp_len", dict(clamp_len=True)),
    ("bptt_depth", dict(bptt_depth=True)),
    ("knn_layers", dict(knn_layers=[True])),
    ("block_size", dict(block_size=True)),
    ("num_buckets", dict(num_buckets=True)),
    ("attention_window", dict(attention_window=True)),
    ("vocab_size", dict(vocab_size=300.0)),
    # NaN / division by zero later
    ("layer_norm_eps", dict(layer_norm_eps=0)),
    ("layer_norm_eps", dict(layer_norm_eps=-1e-5)),
    ("layer_norm_eps", dict(layer_norm_eps=float("nan"))),
    ("layer_norm_eps", dict(layer_norm_eps="1e-5")),
    ("rope_theta", dict(rope_theta=0)),
    ("rope_theta", dict(rope_theta=-10000.0)),
    ("rope_theta", dict(rope_theta=math.inf)),
    ("initializer_range", dict(initializer_range=-0.02)),
    # head_dim the rotary positions cannot use (derived, or given)
    ("head_dim", dict(hidden_size=60, num_attention_heads=4)),
    ("head_dim", dict(head_dim=15)),
    ("head_dim", dict(head_dim=True)),
    ("hidden_act", dict(hidden_act="gelu2")),
    ("hidden_act", dict(hidden_act=None)),
    # dropout that is not a number, or outside [0, 1)
    ("hidden_dropout_prob", dict(hidden_dropout_prob="0.1")),
    ("hidden_dropout_prob", dict(hidden_dropout_prob=None)),
    ("hidden_dropout_prob", dict(hidden_dropout_prob=True)),
    ("hidden_dropout_prob", dict(hidden_dropout_prob=1.0)),
    ("attention_dropout", dict(attention_dropout=-0.1)),
    ("attention_dropout", dict(attention_dropout="none")),
    # special tokens outside the embedding
    ("pad_token_id", dict(pad_token_id=259)),
    ("pad_token_id", dict(vocab_size=100, pad_token_id=100)),
    ("pad_token_id", dict(pad_token_id=-1)),
    ("pad_token_id", dict(pad_token_id=1.0)),
    ("eos_token_id", dict(eos_token_id=[1, 300])),
    ("bos_token_id", dict(bos_token_id=-2)),
    ("sep_token_id", dict(sep_token_id=259)),
    # windows the sliding mixer halves (w/2 keys each side), odd or non-positive
    ("attention_window", dict(mixer="sliding", attention_window=7)),
    ("attention_window[1]", dict(mixer="sliding", attention_window=[8, 7])),
    ("attention_window[0]", dict(mixer="sliding", routing_layers=[1], attention_window=[5, 8], num_routing_heads=1)),
    ("attention_window", dict(mixer="sliding", attention_window=0)),
    ("attention_window", dict(attention_window=-4)),  # unused by the mixer, still a bad value
    ("attention_dilation", dict(attention_dilation=[1, 0])),
    # mechanism fields of mixers/memories that are not used are still checked
    ("block_size", dict(block_size=0)),
    ("num_buckets", dict(num_buckets=0)),
    ("lsh_chunk_length", dict(lsh_chunk_length=-1)),
    ("num_clusters", dict(num_clusters=0)),
    ("kmeans_decay", dict(kmeans_decay=1.0)),
    ("num_memory_tokens", dict(num_memory_tokens=-1)),
    ("compression_rate", dict(compression_rate=0)),
    ("knn_top_k", dict(knn_top_k=0)),
    ("knn_backend", dict(knn_backend=3)),
    # flags must be booleans ("yes" or 1 would be truthy by accident)
    ("pre_norm", dict(pre_norm="yes")),
    ("is_decoder", dict(is_decoder=1)),
    ("tie_word_embeddings", dict(tie_word_embeddings="false")),
    ("memory", dict(memory=3)),
    ("mixer", dict(mixer=["full", 3])),
    # bptt_depth with a memory that passes no gradient between segments
    ("bptt_depth", dict(memory="xl", mem_len=8, mixer="relative", bptt_depth=2)),
    ("bptt_depth", dict(memory="none", bptt_depth=3)),
    ("bptt_depth", dict(memory="xl", mem_len=8, mixer="relative", bptt_depth=0)),
]


@pytest.mark.parametrize("field, overrides", BAD_VALUES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_VALUES)])
def test_bad_value_is_refused_naming_the_field(field, overrides):
    message = _refused(lambda: LongLMConfig(**{**TINY, "position_embedding_type": "rotary", **overrides}), field)
    assert message.startswith(("LongLMConfig.", "Unknown")), message


def test_bptt_depth_with_a_memory_without_bptt_says_so():
    message = _refused(lambda: LongLMConfig.from_preset("transformer-xl", **TINY, bptt_depth=2), "bptt_depth=2", "'xl'")
    assert "group" not in message and "rmt" in message


def test_a_preset_bptt_depth_goes_with_its_memory():
    """rmt's bptt_depth=2 is part of its memory: swapping the memory out drops it, passing it again is refused."""
    assert LongLMConfig.from_preset("rmt", **TINY, memory="none").bptt_depth == 1
    assert LongLMConfig.from_preset("rmt", **TINY).bptt_depth == PRESETS.get("rmt")["bptt_depth"] == 2
    _refused(lambda: LongLMConfig.from_preset("rmt", **TINY, memory="none", bptt_depth=2), "bptt_depth=2", "'none'")


def test_legacy_layer_keys_migrate_to_layer_mixers(tmp_path):
    """Folders saved before `layer_mixers` (per-mixer layer lists) still load, as the same per-layer mixers, and
    save the new key only."""
    import json

    legacy = {**LongLMConfig(**TINY, mixer="sliding", attention_window=4).to_dict(), "routing_layers": [1]}
    legacy.pop("layer_mixers")
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    loaded = LongLMConfig.from_pretrained(tmp_path)
    assert loaded.mixers == ["sliding", "routing"]
    assert "routing_layers" not in loaded.to_dict() and loaded.to_dict()["layer_mixers"] == ["sliding", "routing"]
    _refused(lambda: LongLMConfig(**TINY, knn_layers=[5], memory="knn"), "knn_layers", "[0, 2)")
    _refused(lambda: LongLMConfig(**TINY, layer_mixers=["full"]), "layer_mixers", "num_hidden_layers")
    _refused(lambda: LongLMConfig(**TINY, layer_mixers=["full", "nope"]), "nope")


@pytest.mark.parametrize("name", ["longformer", "routing"])
def test_odd_window_of_a_sliding_preset(name):
    _refused(lambda: tiny_preset_config(name, attention_window=9), "attention_window", "'sliding'", "9")


GOOD_VALUES = [
    dict(mixer="full", layer_mixers=["routing", "routing"], attention_window=7, num_routing_heads=1),  # routing: no halving rule
    dict(memory="rmt", mixer="relative", num_memory_tokens=2, bptt_depth=3, position_embedding_type="none"),
    dict(head_dim=15, position_embedding_type="none"),
    dict(hidden_size=60, num_attention_heads=4, position_embedding_type="absolute"),
    dict(eos_token_id=[1, 2], pad_token_id=None, sep_token_id=258),
    dict(hidden_dropout_prob=0, attention_dropout=0.5, layer_norm_eps=1e-12, rope_theta=500000),
    dict(initializer_range=0.0, kmeans_decay=0.5, compression_rate=None, clamp_len=None),
    dict(mixer="sliding", attention_window=[2, 6], attention_dilation=[1, [1, 2]]),
]


@pytest.mark.parametrize("overrides", GOOD_VALUES)
def test_valid_edge_values_build(overrides):
    config = LongLMConfig(**{**TINY, **overrides})
    for key, value in overrides.items():
        assert getattr(config, key) == value


def test_every_field_has_a_rule():
    """A new field gets a valid range or is refused here: every field of our own is checked somewhere."""
    from transformers import PretrainedConfig
    import dataclasses

    ours = {f.name for f in dataclasses.fields(LongLMConfig)} - {f.name for f in dataclasses.fields(PretrainedConfig)}
    ruled = set(CORE_FIELD_RULES) | set(STRUCTURED_FIELDS)
    assert ours - ruled == set(), f"fields without a rule: {sorted(ours - ruled)}"
    assert ruled - ours == set(), f"rules for no field: {sorted(ruled - ours)}"
    # the mechanisms' options are not dataclass fields; each carries its own rule and default
    options = mechanism_options()
    assert not set(options) & ours, f"options that are also core fields: {sorted(set(options) & ours)}"
    config = LongLMConfig()
    assert all(getattr(config, name) == spec.default for name, spec in options.items())


# --------------------------------------------------------------------------------------------------
# every preset still builds and round-trips
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_keys_are_fields(name):
    from longlm.config_migration import LEGACY_LAYER_KEYS

    _ = LongLMConfig.from_preset(name)  # would raise on a key that is no field
    known = set(LongLMConfig.__dataclass_fields__) | set(mechanism_options()) | set(LEGACY_LAYER_KEYS)
    assert set(PRESETS.get(name)) <= known


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_config_round_trips(tmp_path, name):
    config = LongLMConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    loaded = LongLMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert LongLMConfig(**config.to_dict()).to_dict() == config.to_dict()  # what checkpoints store
    assert LongLMConfig.from_dict(config.to_diff_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_tiny_preset_model_builds_and_round_trips(tmp_path, name):
    model = LongLMForCausalLM(tiny_preset_config(name)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" in saved and saved["model_type"] == "longlm"  # HF's own keys, accepted back
    loaded = LongLMForCausalLM.from_pretrained(tmp_path).eval()
    assert LongLMConfig(**loaded.config.to_dict()).to_dict() == loaded.config.to_dict()
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
