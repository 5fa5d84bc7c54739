"""Paper recipes as presets: a preset is only a set of `LongLMConfig` field values.

Training-side settings of a recipe (segment length, batch, learning rate) live in the YAML files under
`configs/`; what is here is the architecture.
"""
from __future__ import annotations

from typing import Any

from longlm.registry import Registry

PRESETS: Registry[dict[str, Any]] = Registry("preset")

# Dai et al. 2019, enwik8 base: 12 layers, d=512, 8 heads of 64, d_inner=2048, post-norm,
# relative positions with per-layer u/v biases, 512 cached states per layer (41M parameters).
PRESETS.register("transformer-xl")(
    dict(
        mixer="relative",
        memory="xl",
        mem_len=512,
        num_hidden_layers=12,
        hidden_size=512,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="relu",
        hidden_dropout_prob=0.1,
        attention_dropout=0.0,
        pre_norm=False,
        scale_embeddings=True,
        position_embedding_type="none",
    )
)

# A plain causal Transformer with rotary positions and SDPA attention: the baseline every recipe is
# compared against (no memory, so the context is one segment).
PRESETS.register("full")(
    dict(
        mixer="full",
        memory="none",
        mem_len=0,
        num_hidden_layers=12,
        hidden_size=512,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_dropout=0.0,
        pre_norm=True,
        position_embedding_type="rotary",
    )
)
