"""`xl`: Transformer-XL segment recurrence (Dai et al. 2019).

The input of every layer for the last `mem_len` positions is cached (without gradient) and attended as
extra keys/values by the same layer in the next segment.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from longlm.memory.base import MemoryState, SegmentMemory
from longlm.memory.registry import MEMORIES


@dataclasses.dataclass
class XLMemoryState(MemoryState):
    """`hidden[i]` is layer i's cached input (B, M, D); `valid` (B, M) marks slots that hold real tokens."""

    hidden: tuple[torch.Tensor, ...]
    valid: torch.Tensor
    num_tokens: int = 0

    def reset_rows(self, rows: torch.Tensor) -> "XLMemoryState":
        keep = ~rows.to(device=self.valid.device, dtype=torch.bool)
        hidden = tuple(h * keep[:, None, None].to(h.dtype) for h in self.hidden)
        return dataclasses.replace(self, hidden=hidden, valid=self.valid & keep[:, None])

    @property
    def length(self) -> int:
        return self.valid.shape[1]


@MEMORIES.register("xl")
class XLMemory(SegmentMemory):
    @property
    def carries_context(self) -> bool:
        """Only a memory that keeps states (mem_len > 0) can stand in for the earlier tokens."""
        return self.config.mem_len > 0

    def context(self, state: XLMemoryState | None, layer_idx: int):
        if state is None or state.length == 0:
            return None, None
        return state.hidden[layer_idx], state.valid

    def update(self, state: XLMemoryState | None, layer_inputs: list[torch.Tensor], token_mask: torch.Tensor | None):
        mem_len = self.config.mem_len
        batch, length = layer_inputs[0].shape[:2]
        new_valid = (
            torch.ones(batch, length, dtype=torch.bool, device=layer_inputs[0].device)
            if token_mask is None
            else token_mask.bool()
        )
        num_tokens = (state.num_tokens if state is not None else 0) + length
        if mem_len == 0:
            empty = layer_inputs[0].new_zeros(batch, 0, layer_inputs[0].shape[-1])
            return XLMemoryState(tuple(empty for _ in layer_inputs), new_valid[:, :0], num_tokens)
        with torch.no_grad():
            if state is None or state.length == 0:
                hidden = tuple(h[:, -mem_len:].detach() for h in layer_inputs)
                valid = new_valid[:, -mem_len:]
            else:
                hidden = tuple(
                    torch.cat([old, new.detach()], dim=1)[:, -mem_len:] for old, new in zip(state.hidden, layer_inputs)
                )
                valid = torch.cat([state.valid, new_valid], dim=1)[:, -mem_len:]
        return XLMemoryState(hidden, valid, num_tokens)

    def state_from_dict(self, data: dict[str, Any]) -> XLMemoryState:
        return XLMemoryState(tuple(data["hidden"]), data["valid"], int(data.get("num_tokens", 0)))
