"""`LongLMConfig`: one Hugging Face config for every mixer/memory combination.

A paper recipe is a preset (see `longlm.presets`): a named set of field values, so
`LongLMConfig.from_preset("transformer-xl", hidden_size=256)` is the whole story.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from longlm.attention import MIXERS
from longlm.memory import MEMORIES

POSITION_EMBEDDING_TYPES = ("none", "rotary", "absolute")  # "relative" positions belong to the relative mixer
# mixer name -> config field listing the layers that use it instead of `mixer`
LAYER_MIXER_FIELDS = {"knn": "knn_layers", "routing": "routing_layers"}


class LongLMConfig(PretrainedConfig):
    """Configuration of a longlm decoder (or, later, encoder).

    Field names follow Hugging Face (`hidden_size`, `num_hidden_layers`, ...). The two plug points:
    `mixer` (a name, or one name per layer) picks the token mixer; `memory` picks the state
    carried across segments (`mem_len` states per layer for `xl`).
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
    mixer: Any = "full"
    memory: str = "none"
    mem_len: int = 0
    clamp_len: int | None = None
    same_length: bool = False
    position_embedding_type: str = "rotary"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # BERT-family embeddings (what Longformer/BigBird checkpoints need, see scripts/convert_hf.py): learned
    # absolute positions numbered from `position_offset` (RoBERTa/Longformer count from padding_idx + 1 = 2),
    # `type_vocab_size` token-type rows (0 = none), a LayerNorm over the summed embeddings, and biases on the
    # attention projections of the mixers that have them (`TokenMixer.supports_attention_bias`)
    position_offset: int = 0
    type_vocab_size: int = 0
    embedding_norm: bool = False
    attention_bias: bool = False
    # compressive memory (Rae et al. 2020)
    cmem_len: int = 0
    compression_rate: int | None = None
    compression_fn: str = "conv"
    # Memorizing Transformer (Wu et al. 2022): layers whose mixer is `knn`, and the per-row store
    knn_layers: list[int] | None = None
    knn_memory_size: int = 65536
    knn_top_k: int = 32
    knn_backend: str = "torch"
    # Recurrent Memory Transformer (Bulatov et al. 2022)
    num_memory_tokens: int = 0
    bptt_depth: int = 1
    # Longformer (Beltagy et al. 2020), mixer `sliding`: total window (one int, or one per layer; each
    # token sees attention_window // 2 keys on each side), dilation (one int, one per head, or one per
    # layer of those)
    attention_window: Any = 512
    attention_dilation: Any = 1
    # BigBird (Zaheer et al. 2020), mixer `block_sparse`: block size, random blocks per query block, seed
    # of the (fixed) random plan
    block_size: int = 64
    num_random_blocks: int = 3
    random_blocks_seed: int = 0
    # Reformer (Kitaev et al. 2020), mixer `lsh`
    num_buckets: int = 32
    num_hashes: int = 1
    lsh_chunk_length: int = 64
    lsh_hash_seed: int = 0  # seed of the fixed random rotations (layer i uses lsh_hash_seed + i)
    # Routing Transformer (Roy et al. 2021), mixer `routing` in `routing_layers` (others keep `mixer`)
    routing_layers: list[int] | None = None
    num_clusters: int = 8
    num_routing_heads: int = 2
    kmeans_decay: float = 0.999
    # skeleton options (Reformer): reversible residual blocks, feed-forward computed in chunks of tokens
    reversible: bool = False
    feed_forward_chunk_size: int = 0
    is_decoder: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = None
    # ends the question in `<s> question </s></s> context </s>`: question answering puts global attention on
    # the tokens before the first one (Longformer's convention) when the mixer has global tokens
    sep_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None and isinstance(self.hidden_size, int) and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check()

    @property
    def mixers(self) -> list[str]:
        """One mixer name per layer (`knn_layers` / `routing_layers` put that mixer in those layers)."""
        names = [self.mixer] * self.num_hidden_layers if isinstance(self.mixer, str) else list(self.mixer)
        for name, layers in LAYER_MIXER_FIELDS.items():
            for index in getattr(self, layers) or []:
                names[index] = name
        return names

    def _check(self) -> None:
        """One clear sentence per bad field (raised as ValueError)."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LongLMConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LongLMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if not isinstance(self.mem_len, int) or self.mem_len < 0:
            raise ValueError(f"LongLMConfig.mem_len must be a non-negative integer, got {self.mem_len!r}.")
        if self.clamp_len is not None and (not isinstance(self.clamp_len, int) or self.clamp_len <= 0):
            raise ValueError(f"LongLMConfig.clamp_len must be a positive integer or None, got {self.clamp_len!r}.")
        if not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings <= 0:
            raise ValueError(
                f"LongLMConfig.max_position_embeddings must be a positive integer, got {self.max_position_embeddings!r}."
            )
        for rate in ("hidden_dropout_prob", "attention_dropout"):
            if not 0.0 <= getattr(self, rate) < 1.0:
                raise ValueError(f"LongLMConfig.{rate} must be in [0, 1), got {getattr(self, rate)!r}.")
        if not isinstance(self.mixer, (str, list, tuple)):
            raise ValueError(f"LongLMConfig.mixer must be a mixer name or a list of names, got {self.mixer!r}.")
        if not isinstance(self.mixer, str) and len(self.mixer) != self.num_hidden_layers:
            raise ValueError(
                f"LongLMConfig.mixer lists {len(self.mixer)} mixers but num_hidden_layers is {self.num_hidden_layers}."
            )
        for field in LAYER_MIXER_FIELDS.values():
            for index in getattr(self, field) or []:
                if not isinstance(index, int) or not 0 <= index < self.num_hidden_layers:
                    raise ValueError(
                        f"LongLMConfig.{field} holds {index!r}, not a layer index in [0, {self.num_hidden_layers})."
                    )
        if set(self.knn_layers or []) & set(self.routing_layers or []):
            raise ValueError("LongLMConfig.knn_layers and routing_layers name the same layer; a layer has one mixer.")
        if not isinstance(self.feed_forward_chunk_size, int) or self.feed_forward_chunk_size < 0:
            raise ValueError(
                f"LongLMConfig.feed_forward_chunk_size must be a non-negative integer (0 = no chunking), "
                f"got {self.feed_forward_chunk_size!r}."
            )
        if self.reversible and not self.pre_norm:
            raise ValueError("LongLMConfig.reversible=True needs pre_norm=True: a post-norm block cannot be inverted.")
        if self.reversible and self.memory != "none":
            raise ValueError(
                f"LongLMConfig.reversible=True stores no per-layer activations, so it needs memory='none', "
                f"got memory='{self.memory}'."
            )
        for name in sorted(set(self.mixers)):
            MIXERS.get(name).check_config(self)  # unknown names raise with the list of valid ones
        MEMORIES.get(self.memory).check_config(self)
        for name in ("position_offset", "type_vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"LongLMConfig.{name} must be a non-negative integer, got {getattr(self, name)!r}.")
        if self.attention_bias:
            without = sorted(name for name in set(self.mixers) if not MIXERS.get(name).supports_attention_bias)
            if without:
                raise ValueError(
                    f"LongLMConfig.attention_bias=True needs mixers with biased projections, but {without} have none; "
                    "expected attention_bias=False with these mixers."
                )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"Unknown position_embedding_type '{self.position_embedding_type}'; "
                f"expected one of {list(POSITION_EMBEDDING_TYPES)}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LongLMConfig":
        """Build a config from a paper recipe (`longlm.presets.PRESETS`) with field overrides."""
        from longlm.presets import PRESETS

        return cls(**{**PRESETS.get(name), **overrides})
