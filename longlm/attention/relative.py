"""`relative`: Transformer-XL attention (Dai et al. 2019) with relative sinusoidal positions.

score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_r R_{i-j}, with learned per-layer biases u, v,
`clamp_len` capping the distances, and `same_length` giving every query the same number of keys.
The position term is computed for each distance once and shifted into place (the "relative shift"),
then passed to SDPA as an additive bias, so the content term uses the fused kernel.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from longlm.attention.base import ContentProjections, MixerInputs, TokenMixer
from longlm.attention.backends import attend
from longlm.attention.masks import segment_attention_mask
from longlm.attention.registry import MIXERS
from longlm.layers.positions import sinusoid_table


def relative_shift(scores: torch.Tensor, key_length: int) -> torch.Tensor:
    """Turn scores indexed by distance into scores indexed by key.

    `scores[..., i, p]` belongs to distance `d_p = key_length - 1 - p`; the result `[..., i, j]` holds the
    score for distance `(M + i) - j` where M = key_length - L. Entries for keys beyond what a causal query
    may see are garbage and must be masked by the caller.
    """
    *lead, query_length, num_distances = scores.shape
    padded = F.pad(scores, (1, 0))
    padded = padded.reshape(*lead, num_distances + 1, query_length)
    shifted = padded[..., 1:, :].reshape(*lead, query_length, num_distances)
    return shifted[..., :key_length]


def relative_distances(query_length: int, key_length: int, causal: bool, device: torch.device) -> torch.Tensor:
    """Distances K-1, K-2, ..., down to 0 (causal) or down to -(L-1) (bidirectional)."""
    lowest = 0 if causal else -(query_length - 1)
    return torch.arange(key_length - 1, lowest - 1, -1, device=device)


@MIXERS.register("relative")
class RelativeAttention(TokenMixer):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.hidden_size: int = config.hidden_size
        self.q_proj = nn.Linear(config.hidden_size, self.inner_size, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.inner_size, bias=False)
        self.r_proj = nn.Linear(config.hidden_size, self.inner_size, bias=False)
        self.o_proj = nn.Linear(self.inner_size, config.hidden_size, bias=False)
        self.content_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # v

    provides_projections = True

    def content_projections(self) -> ContentProjections:
        return ContentProjections.of(self.q_proj, self.kv_proj, self.num_heads, self.head_dim)

    def configure(self, config) -> None:
        super().configure(config)
        self.clamp_len: int | None = config.clamp_len

    def init_extra_parameters(self, init_normal) -> None:
        init_normal(self.content_bias)
        init_normal(self.position_bias)

    def position_scores(self, q: torch.Tensor, key_length: int, causal: bool, scale: float = 1.0) -> torch.Tensor:
        """scale * (q + v) . W_r R_{i-j}, shifted so the last axis indexes keys: (B, H, L, K).

        The scale is applied to the (B, H, L, Dh) side, which is smaller than the (B, H, L, K) result."""
        query_length = q.shape[-2]
        distances = relative_distances(query_length, key_length, causal, q.device)
        clamp = self.clamp_len
        if clamp is not None:
            distances = distances.clamp(min=-clamp, max=clamp)
        table = sinusoid_table(distances, self.hidden_size).to(q.dtype)
        r = self.r_proj(table).view(-1, self.num_heads, self.head_dim)  # (P, H, Dh)
        raw = torch.einsum("bhld,phd->bhlp", (q + self.position_bias[:, None, :]) * scale, r)
        return relative_shift(raw, key_length)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        return self.o_proj(self.merge_heads(self.attend_heads(hidden, inputs)[0]))

    def attend_heads(self, hidden: torch.Tensor, inputs: MixerInputs):
        """Per-head attention output (B, H, L, Dh) before `o_proj`, with the q (B, H, L, Dh) and the
        k, v (B, H, M + L, Dh) it used (mixers built on this one, e.g. `knn`, combine per head)."""
        query_length = hidden.shape[1]
        q = self.split_heads(self.q_proj(hidden))
        kv = self.project_with_memory(self.kv_proj, hidden, inputs.memory)
        k, v = (self.split_heads(t) for t in kv.chunk(2, dim=-1))
        key_length = k.shape[2]
        bias = self.position_scores(q, key_length, inputs.causal, scale=self.scale)
        window = self.same_length_window
        mask = segment_attention_mask(
            query_length,
            inputs.memory_length,
            causal=inputs.causal,
            key_mask=inputs.key_mask,
            same_length_window=window,
            documents=inputs.documents,
            device=hidden.device,
        )
        dropout = self.attention_dropout_p
        out = attend(
            q + self.content_bias[:, None, :], k, v, mask=mask, bias=bias, causal=inputs.causal, dropout=dropout, scale=self.scale,
            implementation=self.attn_implementation,
        )
        return out, q, k, v
