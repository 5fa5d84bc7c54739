"""`LongLMConfig`: one Hugging Face config for every mixer/memory combination.

A paper recipe is a preset (see `longlm.presets`): a named set of field values, so
`LongLMConfig.from_preset(name, hidden_size=256)` is the whole story. The config core names no mechanism:
each mixer and memory declares its own options (`longlm.options`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
from typing import Any, Callable

from transformers import GenerationConfig, PretrainedConfig
from transformers.activations import ACT2FN

from longlm.attention import MIXERS
from longlm.config_migration import LEGACY_LAYER_KEYS, migrate_config_dict
from longlm.memory import MEMORIES
from longlm.options import Option, collect_options, is_int, is_number, non_negative_int, positive_int, positive_int_or_none


def mechanism_options() -> dict[str, Option]:
    """The options of every registered mixer and memory (read at each call: a plug-in registered later counts)."""
    return collect_options(
        [MIXERS.get(name) for name in MIXERS.names()] + [MEMORIES.get(name) for name in MEMORIES.names()]
    )

POSITION_EMBEDDING_TYPES = ("none", "rotary", "absolute")  # "relative" positions belong to the relative mixer
# Keys Hugging Face accepts or writes on a config that neither the dataclass fields nor a fresh
# `PretrainedConfig` show: `PretrainedConfig.__init__` arguments of transformers 4.x (still in config.json
# files and in transformers' common tests), keys `__post_init__` pops (also found in its source, see
# `_hf_post_init_keys`), and keys written next to the fields (`auto_map` by save_pretrained with custom code,
# `quantization_config` by quantizers, `_attn_implementation_autoset` by transformers 4.4x)
HF_EXTRA_CONFIG_KEYS = frozenset(
    {
        "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size",
        "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "tokenizer_class", "prefix",
        "task_specific_params", "decoder_start_token_id",
        "torch_dtype", "num_labels", "rope_scaling", "name_or_path", "_commit_hash", "output_attentions",
        "attn_implementation", "experts_implementation", "per_layer_config",
        "_attn_implementation_internal", "_experts_implementation_internal",
        "model_type", "auto_map", "quantization_config", "_attn_implementation_autoset", "_name_or_path",
    }
)


def _probability(value: Any) -> bool:
    return is_number(value) and 0.0 <= value < 1.0


def _positive_number(value: Any) -> bool:
    return is_number(value) and value > 0


def _layer_mixers(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value))


# field -> (valid?, what was expected), checked before the mixers read them (sizes, rates, flags)
CORE_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{
        name: (positive_int, "a positive integer")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "head_dim")
    },
    "max_position_embeddings": (positive_int, "a positive integer"),
    "mem_len": (non_negative_int, "a non-negative integer"),
    "clamp_len": (positive_int_or_none, "a positive integer or None"),
    "position_offset": (non_negative_int, "a non-negative integer"),
    "type_vocab_size": (non_negative_int, "a non-negative integer"),
    "feed_forward_chunk_size": (non_negative_int, "a non-negative integer (0 = no chunking)"),
    "bptt_depth": (positive_int, "a positive integer (segments per gradient window)"),
    "hidden_dropout_prob": (_probability, "a number in [0, 1)"),
    "attention_dropout": (_probability, "a number in [0, 1)"),
    "layer_norm_eps": (_positive_number, "a positive number (the LayerNorm divides by sqrt(variance + eps))"),
    "rope_theta": (_positive_number, "a positive number (the rotary base)"),
    "initializer_range": (lambda v: is_number(v) and v >= 0, "a non-negative number (the init std)"),
    "hidden_act": (lambda v: isinstance(v, str) and v in ACT2FN, f"one of {sorted(ACT2FN)}"),
    "memory": (lambda v: isinstance(v, str), "a memory name"),
    "position_embedding_type": (lambda v: isinstance(v, str), f"one of {list(POSITION_EMBEDDING_TYPES)}"),
    "layer_mixers": (_layer_mixers, "None or a list of mixer names, one per layer"),
    **{
        name: (lambda v: isinstance(v, bool), "True or False")
        for name in (
            "pre_norm", "scale_embeddings", "same_length", "embedding_norm", "attention_bias", "reversible",
            "is_decoder", "tie_word_embeddings", "use_cache", "question_global_attention",
        )
    },
}
TOKEN_ID_FIELDS = ("pad_token_id", "eos_token_id", "bos_token_id", "sep_token_id")
# fields checked by their own code below rather than by a rule table
STRUCTURED_FIELDS = ("mixer",) + TOKEN_ID_FIELDS


def _check_rules(config: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """One sentence naming the first field whose value breaks its rule."""
    for name, (valid, expected) in rules.items():
        value = getattr(config, name)
        if not valid(value):
            raise ValueError(f"LongLMConfig.{name} must be {expected}, got {value!r}.")


@functools.lru_cache(maxsize=1)
def _hf_post_init_keys() -> frozenset[str]:
    """Keys `PretrainedConfig.__post_init__` consumes from its kwargs (read from its source, so a key a newer
    transformers adds is accepted too; `HF_EXTRA_CONFIG_KEYS` holds those of the version we test)."""
    try:
        source = inspect.getsource(PretrainedConfig.__post_init__)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(r"kwargs\.(?:pop|get)\(\s*[\"'](\w+)[\"']", source))


@functools.lru_cache(maxsize=None)
def hf_config_keys(config_class: type) -> frozenset[str]:
    """Every key a Hugging Face config of `config_class` accepts: its dataclass fields (PretrainedConfig's
    included), the attributes and `to_dict()` keys of a bare `PretrainedConfig`, the settable properties
    (`num_labels`, `torch_dtype`, `output_attentions`, ...), the generation parameters HF pops from
    configs, the keys its `__post_init__` consumes, and `HF_EXTRA_CONFIG_KEYS`."""
    bare = PretrainedConfig()
    properties = {
        name
        for klass in inspect.getmro(config_class)
        for name, value in vars(klass).items()
        if isinstance(value, property) and value.fset is not None
    }
    return frozenset(
        {field.name for field in dataclasses.fields(config_class)}
        | set(vars(bare))
        | set(bare.to_dict())
        | properties
        | set(config_class.attribute_map)
        | set(GenerationConfig._get_default_generation_params())
        | _hf_post_init_keys()
        | HF_EXTRA_CONFIG_KEYS
    )


def _closest_field(key: str, fields: list[str]) -> str | None:
    """The field `key` most likely meant: difflib's close matches plus the fields `key` truncates or extends
    (`bptt` -> `bptt_depth`), the one sharing the longest prefix first (`mem_length` -> `mem_len`, not
    `same_length`), then the most similar."""
    close = set(difflib.get_close_matches(key, fields, n=3))
    if len(key) >= 3:
        close |= {name for name in fields if name.startswith(key) or key.startswith(name)}
    if not close:
        return None

    def rank(name: str) -> tuple[int, float]:
        return len(os.path.commonprefix([key, name])), difflib.SequenceMatcher(None, key, name).ratio()

    return max(sorted(close), key=rank)


def _unknown_key_message(config_class: type, unknown: list[str], where: str = "") -> str:
    """'Unknown LongLMConfig field 'x'[ in 'file']; did you mean 'y'?' (closest names of our own fields)."""
    fields = sorted(
        {field.name for field in dataclasses.fields(config_class) if not field.name.startswith("_")} | set(mechanism_options())
    )
    name = config_class.__name__

    def hint(key: str) -> str:
        close = _closest_field(key, fields)
        return f"did you mean '{close}'?" if close else f"expected one of {fields}."

    if len(unknown) == 1:
        return f"Unknown {name} field '{unknown[0]}'{where}; {hint(unknown[0])}"
    listed = ", ".join(f"'{key}' ({hint(key).rstrip('.')})" for key in unknown)
    return f"Unknown {name} fields{where}: {listed}."


class LongLMConfig(PretrainedConfig):
    """Configuration of a longlm decoder (or, later, encoder).

    Field names follow Hugging Face (`hidden_size`, `num_hidden_layers`, ...). The two plug points:
    `mixer` (a name) picks the token mixer of every layer, or `layer_mixers` one per layer; `memory` picks the state
    carried across segments (`mem_len` states per layer for a memory that caches states).
    """

    model_type = "longlm"

    vocab_size: int = 259
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int = 1024
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    pre_norm: bool = False
    scale_embeddings: bool = False
    initializer_range: float = 0.02
    mixer: str = "full"
    memory: str = "none"
    mem_len: int = 0
    clamp_len: int | None = None
    same_length: bool = False
    position_embedding_type: str = "rotary"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # BERT-family embeddings (what converted encoder checkpoints need, see scripts/convert_hf.py): learned
    # absolute positions numbered from `position_offset` (RoBERTa counts from padding_idx + 1 = 2),
    # `type_vocab_size` token-type rows (0 = none), a LayerNorm over the summed embeddings, and biases on the
    # attention projections of the mixers that have them (`TokenMixer.supports_attention_bias`)
    position_offset: int = 0
    type_vocab_size: int = 0
    embedding_norm: bool = False
    attention_bias: bool = False
    # Per-layer mixers: one name per layer (Hugging Face's `layer_types` idea; that name is HF's own, validated
    # against its attention kinds); None = `mixer` in every layer.
    # Older configs named per-layer mixers in mechanism-specific keys: the constructor migrates them
    # (`longlm.config_migration`), so folders saved before still load.
    layer_mixers: list[str] | None = None
    # segments per gradient window (memories with `SegmentMemory.backpropagates_through_state`)
    bptt_depth: int = 1
    # Every registered mixer's and memory's own options (`options` on the class, `longlm.options`) are set as
    # attributes too, with their defaults: `config.attention_window`, `config.cmem_len`, ...
    # skeleton options: reversible residual blocks, feed-forward computed in chunks of tokens
    reversible: bool = False
    feed_forward_chunk_size: int = 0
    is_decoder: bool = True
    tie_word_embeddings: bool = True
    # generate() carries the memory (the cache) between steps and feeds only the new tokens; False re-feeds
    # the whole sequence at every step without a memory (Hugging Face's meaning of use_cache=False)
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = None
    # ends the question in `<s> question </s></s> context </s>`: question answering puts global attention on
    # the tokens before the first one (Hugging Face's QA convention) when the mixer has global tokens
    sep_token_id: int | None = None
    # question answering with a mixer that has global tokens: True gives the question global attention
    # (the usual fine-tuning recipe); False leaves every token to its window (the ablation)
    question_global_attention: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # Only keys that are not dataclass fields reach here: the mechanisms' options (set as attributes), the
        # keys older configs used (migrated), and keys Hugging Face sets; anything else is refused, so a typo
        # (`mem_length`) fails instead of being written into config.json
        kwargs = migrate_config_dict(kwargs, self)
        options = mechanism_options()
        for name, spec in options.items():
            setattr(self, name, kwargs.pop(name) if name in kwargs else spec.default)
        self.refuse_unknown_keys(kwargs)
        if self.head_dim is None and is_int(self.hidden_size) and is_int(self.num_attention_heads) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check()

    @classmethod
    def refuse_unknown_keys(cls, keys: Any, where: str = "") -> None:
        """ValueError naming the keys that are neither a field nor a key Hugging Face sets on configs."""
        known = hf_config_keys(cls) | set(mechanism_options()) | set(LEGACY_LAYER_KEYS)
        unknown = [key for key in keys if key not in known]
        if unknown:
            raise ValueError(_unknown_key_message(cls, unknown, where))

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """config.json as a dict, refusing unknown keys with the file's name (a user-edited typo must not
        load silently; `from_pretrained` and `from_json_file` read through here)."""
        config_dict = super()._dict_from_json_file(json_file)
        cls.refuse_unknown_keys(config_dict, where=f" in '{json_file}'")
        return config_dict

    @property
    def mixers(self) -> list[str]:
        """One mixer name per layer: `layer_mixers`, or `mixer` in every layer."""
        if self.layer_mixers is not None:
            return list(self.layer_mixers)
        return [self.mixer] * self.num_hidden_layers

    def layers_with(self, mixer: str) -> list[int]:
        """The indices of the layers whose mixer is `mixer` (what a memory that serves one mixer reads)."""
        return [index for index, name in enumerate(self.mixers) if name == mixer]

    def _check(self) -> None:
        """One clear sentence per bad field (raised as ValueError)."""
        _check_rules(self, CORE_FIELD_RULES)
        self._check_token_ids()
        self._check_layout()
        for name in sorted(set(self.mixers)):
            MIXERS.get(name).check_config(self)  # unknown names raise with the list of valid ones
        MEMORIES.get(self.memory).check_config(self)
        self._check_plug_contract()
        _check_rules(self, {name: (spec.valid, spec.expected) for name, spec in mechanism_options().items()})
        self._check_combinations()

    def _check_plug_contract(self) -> None:
        """Every layer's mixer hands the memory what the memory reads from it (`TokenMixer.writes`,
        `provides_projections`)."""
        memory = MEMORIES.get(self.memory)
        for index, name in enumerate(self.mixers):
            mixer = MIXERS.get(name)
            if mixer.requires_memory is not None and mixer.requires_memory != self.memory:
                raise ValueError(
                    f"LongLMConfig.memory is '{self.memory}', but layer {index}'s mixer '{name}' reads the memory "
                    f"'{mixer.requires_memory}'; expected memory='{mixer.requires_memory}'."
                )
            needed = memory.required_write(self, index)
            if needed is not None and (mixer.writes is None or not issubclass(mixer.writes, needed)):
                raise ValueError(
                    f"LongLMConfig.memory='{self.memory}' reads {needed.__name__} from layer {index}, but that layer's "
                    f"mixer '{name}' writes {'nothing' if mixer.writes is None else mixer.writes.__name__}; expected "
                    f"a mixer there that writes {needed.__name__}."
                )
            if memory.needs_projections(self) and not mixer.provides_projections:
                raise ValueError(
                    f"LongLMConfig.memory='{self.memory}' attends through every layer's q/k/v projections, but layer "
                    f"{index}'s mixer '{name}' has none to offer; expected mixers with plain q/k/v projections."
                )

    def _check_token_ids(self) -> None:
        """Special token ids index the embedding: None or an id in [0, vocab_size) (eos: also a list of ids)."""
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(
                    f"LongLMConfig.{name} must be None or a token id in [0, vocab_size={self.vocab_size}), got {value!r}."
                )

    def _check_layout(self) -> None:
        """Heads, per-layer mixers and the options that constrain the block structure."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LongLMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if not isinstance(self.mixer, str):
            raise ValueError(
                f"LongLMConfig.mixer must be a mixer name (per-layer names go in layer_mixers), got {self.mixer!r}."
            )
        if self.layer_mixers is not None and len(self.layer_mixers) != self.num_hidden_layers:
            raise ValueError(
                f"LongLMConfig.layer_mixers lists {len(self.layer_mixers)} mixers but num_hidden_layers is "
                f"{self.num_hidden_layers}; expected one mixer name per layer."
            )
        if self.reversible and not self.pre_norm:
            raise ValueError("LongLMConfig.reversible=True needs pre_norm=True: a post-norm block cannot be inverted.")
        if self.reversible and self.memory != "none":
            raise ValueError(
                f"LongLMConfig.reversible=True stores no per-layer activations, so it needs memory='none', "
                f"got memory='{self.memory}'."
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"Unknown position_embedding_type '{self.position_embedding_type}'; "
                f"expected one of {list(POSITION_EMBEDDING_TYPES)}."
            )

    def _check_combinations(self) -> None:
        """Values that are each valid but crash, or silently mean something else, together."""
        if self.attention_bias:
            without = sorted(name for name in set(self.mixers) if not MIXERS.get(name).supports_attention_bias)
            if without:
                raise ValueError(
                    f"LongLMConfig.attention_bias=True needs mixers with biased projections, but {without} have none; "
                    "expected attention_bias=False with these mixers."
                )
        if self.position_embedding_type == "rotary" and self.head_dim % 2:
            raise ValueError(
                f"LongLMConfig.head_dim must be even with position_embedding_type='rotary' (rotary embeddings "
                f"rotate pairs of dimensions), got {self.head_dim}; expected an even head_dim or another "
                f"position_embedding_type."
            )
        if self.bptt_depth > 1 and not MEMORIES.get(self.memory).backpropagates_through_state:
            through = [name for name in MEMORIES.names() if MEMORIES.get(name).backpropagates_through_state]
            raise ValueError(
                f"LongLMConfig.bptt_depth={self.bptt_depth} backpropagates through the memory carried between "
                f"segments, but memory '{self.memory}' passes no gradient between segments; expected bptt_depth=1 "
                f"or a memory in {through}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LongLMConfig":
        """Build a config from a paper recipe (`longlm.presets.PRESETS`) with field overrides."""
        from longlm.presets import PRESETS

        fields = dict(PRESETS.get(name))
        if any(key in overrides for key in ("layer_mixers", *LEGACY_LAYER_KEYS)):
            fields.pop("layer_mixers", None)  # per-layer mixers given by the caller replace the preset's
        memory = MEMORIES.get(overrides.get("memory", fields.get("memory", "none")))
        if not memory.backpropagates_through_state and "bptt_depth" not in overrides:
            # the preset's bptt_depth belongs to its memory: swapping in a memory without BPTT drops it,
            # while a bptt_depth the caller passes with such a memory is refused by `_check`
            fields.pop("bptt_depth", None)
        return cls(**{**fields, **overrides})
