"""HF output dataclasses extended with `.memory`, the state to pass to the next segment."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from longlm.memory.base import MemoryState


@dataclass
class LongLMModelOutput(BaseModelOutput):
    memory: MemoryState | None = None


@dataclass
class LongLMCausalLMOutput(CausalLMOutput):
    memory: MemoryState | None = None
