"""HF output dataclasses extended with `.memory`, the state to pass to the next segment."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, MaskedLMOutput, QuestionAnsweringModelOutput

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


@dataclass
class LongLMMaskedLMOutput(MaskedLMOutput):
    """As `LongLMCausalLMOutput`, for the masked-LM head (`lm_loss` is the MLM loss)."""

    memory: MemoryState | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class LongLMQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    """HF's QA output plus the global attention mask the model used (the question tokens, set automatically
    for mixers with global tokens), so callers can see where global attention landed, and the memory after
    the segment (as the other heads return it: a long document can be read segment by segment)."""

    global_attention_mask: torch.Tensor | None = None
    memory: MemoryState | None = None
