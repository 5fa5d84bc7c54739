"""HF output dataclasses extended with `.memory`, the state to pass to the next segment."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from longlm.memory.base import MemoryState


@dataclass
class LongLMModelOutput(BaseModelOutput):
    memory: MemoryState | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class LongLMCausalLMOutput(CausalLMOutput):
    """`loss` = `lm_loss` + the memory's auxiliary losses (which train only the memory's own parameters)."""

    memory: MemoryState | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
