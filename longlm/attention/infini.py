"""`infini`: Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind").

Per layer and head, with the segment's queries Q, keys K and values V (L tokens) and the compressive memory
(M (Dk, Dv), z (Dk)) left by the earlier segments (the `infini` memory, `longlm.memory.infini`):

    sigma(x) = ELU(x) + 1
    A_mem    = sigma(Q) M / (sigma(Q) z)                              retrieval (eq. 3)
    A_dot    = softmax(Q K^T / sqrt(Dk) + causal mask) V               local attention within the segment
    A        = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot     learned gate per head (eq. 6)
    out      = concat_heads(A) W_O

and the memory the next segment reads (what this mixer writes, `InfiniWrite`):

    linear rule (eq. 4):  M_s = M + sigma(K)^T V
    delta rule  (eq. 5):  M_s = M + sigma(K)^T (V - sigma(K) M / (sigma(K) z))     (`infini_delta_rule=True`)
    both:                 z_s = z + sum_t sigma(K_t)

An empty memory (the first segment, a reset row) retrieves 0 where the paper's 0/0 is undefined: the
denominator is clamped to `RETRIEVAL_EPS` and the numerator is exactly 0. Rotary positions (when configured)
rotate the local attention's q/k only; the memory is position-free, as in the paper. Local attention honours
padding and document boundaries like `full`. A token at or after a document start inside the segment reads
an empty memory (the memory belongs to the earlier document), and only the row's last document is written,
so a document begun mid-segment gets what a fresh row gets.

The write keeps the graph: with `bptt_depth` > 1 the loss reaches the projections of earlier segments
through the memory; the training loop detaches the state between gradient windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longlm.attention.base import ContentProjections, MixerInputs, MixerOutput, TokenMixer
from longlm.attention.backends import attend
from longlm.attention.masks import segment_attention_mask
from longlm.attention.registry import MIXERS
from longlm.layers.positions import apply_rotary, rotary_for
from longlm.options import BOOL, option

RETRIEVAL_EPS = 1e-6  # floor of sigma(Q) z: an empty memory (z = 0) retrieves 0 instead of 0/0


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = ELU(x) + 1 (positive, so the normaliser sigma(Q) z is positive once anything is stored)."""
    return F.elu(x) + 1.0


@dataclass
class InfiniWrite:
    """What an infini layer hands its memory after a segment: the additions to M (B, H, Dk, Dv) and z (B, H, Dk),
    and `restart` (B,) True for rows whose last document began inside the segment (their old memory is dropped)."""

    memory: torch.Tensor
    normaliser: torch.Tensor
    restart: torch.Tensor | None


def retrieve(sigma_q: torch.Tensor, memory: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """sigma(Q) M / (sigma(Q) z): (B, H, L, Dk) x (B, H, Dk, Dv), (B, H, Dk) -> (B, H, L, Dv)."""
    numerator = torch.matmul(sigma_q, memory)
    denominator = torch.einsum("bhld,bhd->bhl", sigma_q, normaliser)[..., None]
    return numerator / denominator.clamp(min=RETRIEVAL_EPS)


@MIXERS.register("infini")
class InfiniAttention(TokenMixer):
    """Causal (or bidirectional) attention within the segment plus gated retrieval from a compressive memory."""

    supports_attention_bias = True
    provides_projections = True
    writes = InfiniWrite
    requires_memory = "infini"
    options = {"infini_delta_rule": option(False, BOOL)}

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_proj = nn.Linear(config.hidden_size, self.inner_size, bias=config.attention_bias)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.inner_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.inner_size, config.hidden_size, bias=config.attention_bias)
        self.gate_bias = nn.Parameter(torch.zeros(self.num_heads))  # beta: sigmoid(beta) weighs the memory
        self.rotary = config.position_embedding_type == "rotary"
        self.delta_rule = config.infini_delta_rule

    def init_extra_parameters(self, init_normal) -> None:
        init_normal(self.gate_bias)

    def content_projections(self) -> ContentProjections:
        return ContentProjections.of(self.q_proj, self.kv_proj, self.num_heads, self.head_dim)

    def gate(self) -> torch.Tensor:
        """sigmoid(beta), shaped (1, H, 1, 1)."""
        return torch.sigmoid(self.gate_bias)[None, :, None, None]

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        if inputs.memory is not None:
            raise ValueError("The 'infini' mixer attends within the segment and its own memory only; expected mem_len=0.")
        batch, length, _ = hidden.shape
        q = self.split_heads(self.q_proj(hidden))
        k, v = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        local = self._local_attention(q, k, v, inputs)
        sigma_q, sigma_k = feature_map(q), feature_map(k)
        # which tokens read the memory: those before any document start inside the segment
        reads = None if inputs.document_starts is None else inputs.document_starts.long().cumsum(dim=1) == 0
        stored = inputs.payload  # (M, z) of the earlier segments, or None: an empty memory
        if stored is None:
            memory = q.new_zeros(batch, self.num_heads, self.head_dim, self.head_dim)
            normaliser = q.new_zeros(batch, self.num_heads, self.head_dim)
        else:
            memory, normaliser = stored[0].to(q.dtype), stored[1].to(q.dtype)
        retrieved = retrieve(sigma_q, memory, normaliser)
        if reads is not None:
            retrieved = retrieved * reads[:, None, :, None].to(retrieved.dtype)
        gate = self.gate()
        out = gate * retrieved + (1 - gate) * local
        return MixerOutput(self.o_proj(self.merge_heads(out)), self._write(sigma_k, v, memory, normaliser, inputs))

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        length = q.shape[2]
        if self.rotary:
            cos, sin = rotary_for(inputs.rotary, length, self.head_dim, self.rope_theta, q.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        needs_mask = inputs.key_mask is not None or inputs.documents is not None
        mask = (
            segment_attention_mask(
                length, 0, causal=inputs.causal, key_mask=inputs.key_mask, documents=inputs.documents, device=q.device
            )
            if needs_mask
            else None
        )
        dropout = self.attention_dropout_p
        return attend(
            q, k, v, mask=mask, causal=inputs.causal, dropout=dropout, scale=self.scale, implementation=self.attn_implementation,
        )

    def _write(
        self, sigma_k: torch.Tensor, v: torch.Tensor, memory: torch.Tensor, normaliser: torch.Tensor, inputs: MixerInputs
    ) -> InfiniWrite:
        """The additions to (M, z) from the segment's real tokens of each row's last document."""
        written = torch.ones(sigma_k.shape[0], sigma_k.shape[2], dtype=torch.bool, device=sigma_k.device)
        if inputs.key_mask is not None:
            written = written & inputs.key_mask[:, -sigma_k.shape[2] :].bool()
        restart = None
        if inputs.document_starts is not None:
            numbers = inputs.document_starts.long().cumsum(dim=1)
            written = written & (numbers == numbers[:, -1:])
            restart = numbers[:, -1] > 0
            # a row that restarts writes into an empty memory: the delta rule retrieves nothing for it
            empty = restart[:, None, None, None].to(memory.dtype)
            memory, normaliser = memory * (1 - empty), normaliser * (1 - empty[..., 0])
        keep = written[:, None, :, None].to(sigma_k.dtype)
        sigma_k, v = sigma_k * keep, v * keep
        if self.delta_rule:
            v = v - retrieve(sigma_k, memory, normaliser) * keep
        return InfiniWrite(torch.matmul(sigma_k.transpose(-1, -2), v), sigma_k.sum(dim=2), restart)
