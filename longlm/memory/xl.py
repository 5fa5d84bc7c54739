"""`xl`: Transformer-XL segment recurrence (Dai et al. 2019).

The input of every layer for the last `mem_len` positions is cached (without gradient) and attended as
extra keys/values by the same layer in the next segment.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from longlm.memory.base import MemoryState, SegmentMemory, SegmentPass, last_document_tokens
from longlm.memory.registry import MEMORIES


@dataclasses.dataclass
class XLMemoryState(MemoryState):
    """`hidden[i]` is layer i's cached input (B, M, D); `valid` (B, M) marks slots that hold real tokens.

    `fully_valid` is a host-side fact ("every slot is valid"), so the model can skip masking without
    asking the device; it turns False on a reset or padding and True again once those slots scroll out.
    """

    hidden: tuple[torch.Tensor, ...]
    valid: torch.Tensor
    num_tokens: int = 0
    fully_valid: bool = True

    def reset_rows(self, rows: torch.Tensor) -> "XLMemoryState":
        keep = ~rows.to(device=self.valid.device, dtype=torch.bool)
        hidden = tuple(h * keep[:, None, None].to(h.dtype) for h in self.hidden)
        return dataclasses.replace(self, hidden=hidden, valid=self.valid & keep[:, None], fully_valid=False)

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def _append(old: torch.Tensor | None, new: torch.Tensor, mem_len: int) -> torch.Tensor:
    """The last `mem_len` rows of [old; new] (dim 1), as a fresh tensor: no view keeps a larger buffer alive."""
    new = new.detach()[:, -mem_len:]
    keep_old = 0 if old is None else min(old.shape[1], mem_len - new.shape[1])
    if keep_old <= 0:
        return new.clone()
    return torch.cat([old[:, old.shape[1] - keep_old :], new], dim=1)


def _after_last_start(document_starts: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, slots): True for the last `slots` positions of [earlier segments; this segment] that lie at or
    after the row's last document start in this segment (a row without a start keeps every slot)."""
    batch, length = document_starts.shape
    earlier = (~document_starts.bool().any(dim=1, keepdim=True)).expand(batch, max(slots - length, 0))
    return torch.cat([earlier, last_document_tokens(document_starts)], dim=1)[:, -slots:]


@MEMORIES.register("xl")
class XLMemory(SegmentMemory):
    sized_by_mem_len = True

    @property
    def carries_context(self) -> bool:
        """Only a memory that keeps states (mem_len > 0) can stand in for the earlier tokens."""
        return self.mem_len > 0

    def context(self, state: XLMemoryState | None, layer_idx: int):
        if state is None or state.length == 0:
            return None, None
        return state.hidden[layer_idx], state.valid

    def known_valid_mask(self, state: XLMemoryState | None) -> torch.Tensor | None:
        if state is None or state.length == 0 or state.fully_valid:
            return None
        return state.valid

    def update(self, state: XLMemoryState | None, segment: SegmentPass) -> XLMemoryState:
        layer_inputs, token_mask = segment.layer_inputs, segment.token_mask
        mem_len = self.mem_len
        batch, length = layer_inputs[0].shape[:2]
        device = layer_inputs[0].device
        new_valid = torch.ones(batch, length, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
        num_tokens = (state.num_tokens if state is not None else 0) + length
        if mem_len == 0:
            empty = layer_inputs[0].new_zeros(batch, 0, layer_inputs[0].shape[-1])
            return XLMemoryState(tuple(empty for _ in layer_inputs), new_valid[:, :0], num_tokens)
        previous = state if state is not None and state.length > 0 else None
        if token_mask is not None:  # padding leaves the cache: each row's real slots end where its tokens end
            return self._packed_update(previous, layer_inputs, new_valid, num_tokens, segment.document_starts)
        with torch.no_grad():
            hidden = tuple(
                _append(None if previous is None else previous.hidden[i], new, mem_len) for i, new in enumerate(layer_inputs)
            )
            valid = _append(None if previous is None else previous.valid[..., None], new_valid[..., None], mem_len)[..., 0]
        old_slots_left = previous is not None and length < mem_len
        fully_valid = token_mask is None and (not old_slots_left or previous.fully_valid)
        if segment.document_starts is not None and bool(segment.document_starts.any()):
            valid = valid & _after_last_start(segment.document_starts, valid.shape[1])
            fully_valid = False
        return XLMemoryState(hidden, valid, num_tokens, fully_valid)

    def _packed_update(self, previous, layer_inputs, new_valid, num_tokens: int, document_starts) -> XLMemoryState:
        """The update of a padded segment: [cache; segment] with every row's invalid slots moved before its
        valid ones (order kept), then the last `mem_len`, so a padded row caches what the row alone caches."""
        mem_len = self.mem_len
        valid = new_valid
        if document_starts is not None and bool(document_starts.any()):
            valid = valid & _after_last_start(document_starts, valid.shape[1])
        if previous is not None:
            kept = previous.valid
            if document_starts is not None:
                kept = kept & ~document_starts.bool().any(dim=1, keepdim=True)
            valid = torch.cat([kept, valid], dim=1)
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, -mem_len:]
        with torch.no_grad():
            hidden = []
            for i, new in enumerate(layer_inputs):
                stream = new.detach() if previous is None else torch.cat([previous.hidden[i], new.detach()], dim=1)
                hidden.append(stream.gather(1, order[..., None].expand(-1, -1, stream.shape[-1])))
        return XLMemoryState(tuple(hidden), valid.gather(1, order), num_tokens, fully_valid=False)

    def state_from_dict(self, data: dict[str, Any]) -> XLMemoryState:
        return XLMemoryState(
            tuple(data["hidden"]), data["valid"], int(data.get("num_tokens", 0)), bool(data.get("fully_valid", False))
        )
