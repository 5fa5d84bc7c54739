"""One skeleton block: token mixer + feed-forward with residuals, pre- or post-norm. Never names a mechanism."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.activations import ACT2FN

from typing import Any

from longlm.attention.base import MixerInputs, MixerOutput
from longlm.attention.registry import MIXERS


class FeedForward(nn.Module):
    """Position-wise MLP; with `feed_forward_chunk_size` > 0 it runs over chunks of that many tokens, so the
    (L, intermediate_size) activation never exists at once where no graph keeps it (reversible blocks)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.chunk_size = config.feed_forward_chunk_size

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.dropout(self.act(self.up(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.chunk_size or x.shape[1] <= self.chunk_size:
            return self._mlp(x)
        return torch.cat([self._mlp(chunk) for chunk in x.split(self.chunk_size, dim=1)], dim=1)


class LongLMBlock(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.mixer = MIXERS.get(config.mixers[layer_idx])(config, layer_idx)
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> tuple[torch.Tensor, Any]:
        """(the block's output, what its mixer writes for the memory or None)."""
        if self.pre_norm:
            mixed, write = self.mix(self.mixer_norm(hidden), self._normed_memory(inputs))
            hidden = hidden + self.dropout(mixed)
            return hidden + self.feed_forward_branch(hidden), write
        mixed, write = self.mix(hidden, inputs)
        hidden = self.mixer_norm(hidden + self.dropout(mixed))
        return self.ffn_norm(hidden + self.feed_forward(hidden)), write

    def mix(self, hidden: torch.Tensor, inputs: MixerInputs) -> tuple[torch.Tensor, Any]:
        """The mixer's output and its memory write (`MixerOutput`; a bare tensor writes nothing)."""
        out = self.mixer(hidden, inputs)
        return (out.hidden, out.memory_write) if isinstance(out, MixerOutput) else (out, None)

    # The two residual branches of a pre-norm block (what reversible blocks call F and G; reversible models
    # carry no memory, so the branch drops the write).
    def mixer_branch(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        return self.dropout(self.mix(self.mixer_norm(hidden), self._normed_memory(inputs))[0])

    def feed_forward_branch(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.ffn_norm(hidden))

    def _normed_memory(self, inputs: MixerInputs) -> MixerInputs:
        """Pre-norm: memory holds this layer's raw inputs, so it goes through the same norm as the segment."""
        if inputs.memory is None:
            return inputs
        return dataclasses.replace(inputs, memory=self.mixer_norm(inputs.memory))  # keeps the payload
