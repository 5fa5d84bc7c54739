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

# Rae et al. 2020, enwik8: 24 layers, d=1024, 8 heads, d_ff=3072; window (segment) 768, memory 768,
# compressed memory 1152 at rate 3 with a 1-D convolution; relative attention over [cmem; mem; segment].
PRESETS.register("compressive")(
    dict(
        mixer="relative",
        memory="compressive",
        mem_len=768,
        cmem_len=1152,
        compression_rate=3,
        compression_fn="conv",
        num_hidden_layers=24,
        hidden_size=1024,
        num_attention_heads=8,
        intermediate_size=3072,
        hidden_act="relu",
        hidden_dropout_prob=0.1,
        pre_norm=False,
        scale_embeddings=True,
        position_embedding_type="none",
    )
)

# Wu et al. 2022: a 12-layer decoder whose layer 9 (index 8) adds top-32 retrieval from a per-document
# store of 65k past (key, value) pairs, with an XL cache of 512 in every layer.
PRESETS.register("memorizing")(
    dict(
        mixer="relative",
        layer_mixers=["relative"] * 8 + ["knn"] + ["relative"] * 3,
        memory="knn",
        mem_len=512,
        knn_memory_size=65536,
        knn_top_k=32,
        num_hidden_layers=12,
        hidden_size=1024,
        num_attention_heads=8,
        intermediate_size=4096,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        pre_norm=True,
        position_embedding_type="none",
    )
)

# Bulatov et al. 2022: Transformer-XL-sized decoder with 10 memory tokens read before and written after
# each segment, gradient through 2 segments.
PRESETS.register("rmt")(
    dict(
        mixer="relative",
        memory="rmt",
        mem_len=0,
        num_memory_tokens=10,
        bptt_depth=2,
        num_hidden_layers=12,
        hidden_size=512,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="relu",
        hidden_dropout_prob=0.1,
        pre_norm=False,
        scale_embeddings=True,
        position_embedding_type="none",
    )
)

# Beltagy et al. 2020, the small enwik8 character LM: 12 layers, d=512, 8 heads, sliding-window attention
# (window per layer: the base config sets the paper's schedule, growing with depth), global attention
# wherever the caller's `global_attention_mask` asks for it.
PRESETS.register("longformer")(
    dict(
        mixer="sliding",
        memory="none",
        attention_window=512,
        attention_dilation=1,
        num_hidden_layers=12,
        hidden_size=512,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        pre_norm=True,
        position_embedding_type="rotary",
    )
)

# Zaheer et al. 2020 (ITC): BERT-base sized, block size 64, 3 random blocks per query block, the first and
# last blocks global; 3 sliding blocks around each query block. Decoders keep only block 0 global (no global
# last block) and draw each block's random blocks independently of the length, so generation reproduces the
# training-time logits.
PRESETS.register("bigbird")(
    dict(
        mixer="block_sparse",
        memory="none",
        block_size=64,
        num_random_blocks=3,
        num_hidden_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        pre_norm=True,
        position_embedding_type="rotary",
    )
)

# Kitaev et al. 2020, enwik8: shared-QK LSH attention in every layer, reversible residual blocks and
# chunked feed-forward layers, so activation memory does not grow with depth.
PRESETS.register("reformer")(
    dict(
        mixer="lsh",
        memory="none",
        num_buckets=64,
        num_hashes=2,
        lsh_chunk_length=64,
        reversible=True,
        feed_forward_chunk_size=1024,
        num_hidden_layers=12,
        hidden_size=1024,
        num_attention_heads=8,
        intermediate_size=4096,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        pre_norm=True,
        position_embedding_type="rotary",
    )
)

# Roy et al. 2021, enwik8: half the heads route through online k-means clusters (EMA centroids) while the
# other half stay local. The preset routes in the last two layers; configs/enwik8/routing-base.yaml routes in
# every layer, as the authors' released enwik8 recipe does.
PRESETS.register("routing")(
    dict(
        mixer="sliding",
        memory="none",
        attention_window=512,
        layer_mixers=["sliding"] * 10 + ["routing"] * 2,
        num_clusters=16,
        num_routing_heads=4,
        kmeans_decay=0.999,
        num_hidden_layers=12,
        hidden_size=1024,
        num_attention_heads=8,
        intermediate_size=4096,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        pre_norm=True,
        position_embedding_type="rotary",
    )
)


# Munkhdalai et al. 2024, long-context LM: 12 layers, 8 heads of 128, FFN 4096, every layer's attention
# mixed by a learned gate with retrieval from a per-head compressive memory updated with the delta rule (their
# best variant, "Linear + Delta"); segments of 2048 tokens (the YAML's segment length).
PRESETS.register("infini")(
    dict(
        mixer="infini",
        memory="infini",
        infini_delta_rule=True,
        num_hidden_layers=12,
        hidden_size=1024,
        num_attention_heads=8,
        intermediate_size=4096,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        pre_norm=True,
        position_embedding_type="rotary",
    )
)


def layer_mixers_at(name: str, layers: int) -> list[str] | None:
    """Preset `name`'s per-layer mixers for another number of layers: its `mixer` everywhere and its other
    mixer (the Memorizing Transformer's `knn`, the Routing Transformer's `routing`) in the last layer; None
    for a preset with one mixer in every layer."""
    preset = PRESETS.get(name)
    others = [mixer for mixer in preset.get("layer_mixers") or [] if mixer != preset.get("mixer")]
    if not others:
        return None
    return [preset["mixer"]] * (layers - 1) + [others[-1]]


def shrunk_preset(name: str, size: dict[str, Any], mechanism: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Config fields of preset `name` at another size: `size` (layers, width, ...) always applies; a
    `mechanism` value applies only where the preset sets that field (so `mem_len` shrinks a memory but gives
    none to `full`); per-layer mixers follow `layer_mixers_at`. `overrides` last."""
    preset = PRESETS.get(name)
    fields: dict[str, Any] = dict(size)
    fields.update({key: value for key, value in mechanism.items() if preset.get(key)})
    layers = fields.get("num_hidden_layers", preset.get("num_hidden_layers"))
    if layer_mixers_at(name, layers) is not None:
        fields["layer_mixers"] = layer_mixers_at(name, layers)
    fields.update(overrides)
    return fields
