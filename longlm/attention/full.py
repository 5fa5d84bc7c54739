"""`full`: exact softmax attention over [memory; segment] through SDPA (flash-attn when installed)."""
from __future__ import annotations

import torch
from torch import nn

from longlm.attention.base import ContentProjections, MixerInputs, TokenMixer
from longlm.attention.backends import attend
from longlm.attention.masks import segment_attention_mask
from longlm.attention.registry import MIXERS
from longlm.attention.kv_cache import cached_step_attention, every_earlier_key
from longlm.layers.positions import apply_rotary, rotary_for


@MIXERS.register("full")
class FullAttention(TokenMixer):
    """Multi-head attention; rotary positions when `position_embedding_type="rotary"`.

    With memory, rotary positions run over [memory; segment], so a query at segment position i has
    absolute position M + i and the scores depend only on the distance to each key.
    """

    supports_attention_bias = True
    supports_kv_cache = True

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_proj = nn.Linear(config.hidden_size, self.inner_size, bias=config.attention_bias)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.inner_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.inner_size, config.hidden_size, bias=config.attention_bias)
        self.rotary = config.position_embedding_type == "rotary"

    provides_projections = True

    def content_projections(self) -> ContentProjections:
        return ContentProjections.of(self.q_proj, self.kv_proj, self.num_heads, self.head_dim)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        if inputs.cache is not None and inputs.cache.past is not None:
            return self._cached_step(hidden, inputs)
        memory_length = inputs.memory_length
        q = self.split_heads(self.q_proj(hidden))
        kv = self.project_with_memory(self.kv_proj, hidden, inputs.memory)
        k, v = (self.split_heads(t) for t in kv.chunk(2, dim=-1))
        if self.rotary:
            cos, sin = rotary_for(inputs.rotary, k.shape[2], self.head_dim, self.rope_theta, hidden.device)
            q = apply_rotary(q, cos[memory_length:], sin[memory_length:])
            k = apply_rotary(k, cos, sin)
        window = self.same_length_window
        needs_mask = inputs.key_mask is not None or window is not None or inputs.documents is not None
        mask = (
            segment_attention_mask(
                hidden.shape[1],
                memory_length,
                causal=inputs.causal,
                key_mask=inputs.key_mask,
                same_length_window=window,
                documents=inputs.documents,
                device=hidden.device,
            )
            if needs_mask
            else None
        )
        dropout = self.attention_dropout_p
        out = attend(
            q, k, v, mask=mask, causal=inputs.causal, dropout=dropout, scale=self.scale, implementation=self.attn_implementation,
        )
        if inputs.cache is not None:  # the prompt of a cached generate(): keep its keys for the next steps
            inputs.cache.write(k, v)
        return self.o_proj(self.merge_heads(out))

    def _cached_step(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        """New tokens after cached keys/values: O(cached keys) per token."""
        q = self.split_heads(self.q_proj(hidden))
        k, v = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        theta = self.rope_theta if self.rotary else None
        out = cached_step_attention(q, k, v, inputs.cache, pattern=every_earlier_key, scale=self.scale, rope_theta=theta,
            implementation=self.attn_implementation,
        )
        return self.o_proj(self.merge_heads(out))
