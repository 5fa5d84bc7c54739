"""Every preset at test size: the preset's own mechanism settings, shrunk so a model builds in milliseconds.

Tests that must hold "for every preset" parametrize over `PRESET_NAMES` (all registered presets, so a new
preset is tested without anyone adding it here) and build with `tiny_preset_config`.
"""
from __future__ import annotations

from typing import Any

from longlm import LongLMConfig
from longlm.presets import PRESETS, shrunk_preset

PRESET_NAMES = sorted(PRESETS.names())

LAYERS = 2
SIZE = dict(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4, intermediate_size=128)
# mechanism sizes scaled down with the model (the preset keeps every other choice it makes)
SHRINK = dict(
    mem_len=16,
    cmem_len=8,
    compression_rate=2,
    knn_memory_size=64,
    knn_top_k=4,
    num_memory_tokens=4,
    attention_window=8,
    block_size=4,
    num_random_blocks=1,
    num_buckets=4,
    lsh_chunk_length=4,
    num_clusters=2,
    num_routing_heads=2,
    feed_forward_chunk_size=0,
)


def tiny_preset_config(name: str, **overrides: Any) -> LongLMConfig:
    """`name`'s preset at test size; layer lists point at the last layer, dropout is off."""
    fields = shrunk_preset(name, dict(SIZE, hidden_dropout_prob=0.0, attention_dropout=0.0), SHRINK, **overrides)
    return LongLMConfig.from_preset(name, **fields)
