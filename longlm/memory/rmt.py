"""`rmt`: the Recurrent Memory Transformer (Bulatov et al. 2022).

`num_memory_tokens` (M) vectors are carried from segment to segment as extra tokens of the input:

* decoder (`config.is_decoder`): the layer-0 input is `[read memory; segment; write slots]`. The read memory
  is the memory written by the previous segment (the learned initial memory for a fresh row); the write
  slots are initialised, as in the paper, with a copy of that same read memory. Under causal attention
  the segment tokens see the read memory but never the write slots, and the write slots see everything;
  the final outputs (`SegmentPass.final_hidden`) at the write positions are the next segment's memory.
* encoder: `[memory; segment]`; the final outputs at the memory positions are the next memory (the read
  and write positions coincide, as in the paper's encoder variant).

The written memory is *not* detached: gradient flows through it into earlier segments. The training loop
decides where to cut (`CausalLMPretraining` keeps the graph of `config.bptt_depth` segments, then calls
`MemoryState.detach`). With `num_memory_tokens == 0` nothing is added and no state is returned, so the
model is exactly the plain model (memory `none`).

Generation (`generate()`): the prompt plus everything generated so far is treated as the *current
segment*. Every step re-feeds that whole segment with the same read memory: the state passed as
`generate(..., memory=state)` (the memory written after the earlier segments, e.g. by forwarding them one
by one), or the learned initial memory when none is passed. Nothing is written mid-generation, because the
current segment is not finished; to go on after it, forward the finished text as a segment and pass the
memory it returns. The model reaches this through `generation_memory` (the `SegmentMemory` hook that
`prepare_inputs_for_generation` calls for memories that do not carry the context).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from longlm.memory.base import MemoryState, SegmentMemory, SegmentPass
from longlm.memory.registry import MEMORIES
from longlm.options import NON_NEGATIVE, option


@dataclasses.dataclass
class RMTMemoryState(MemoryState):
    """`memory` (B, M, D) is what the next segment reads; rows where `fresh` (B,) is True read the learned
    initial memory instead (a fresh stream, or a row reset at a document boundary).

    `frozen` (host-side) marks a generation state: it is read again by every step and never advanced.
    """

    memory: torch.Tensor
    fresh: torch.Tensor
    frozen: bool = False

    def reset_rows(self, rows: torch.Tensor) -> "RMTMemoryState":
        rows = rows.to(device=self.fresh.device, dtype=torch.bool)
        memory = self.memory.masked_fill(rows[:, None, None], 0.0)  # also cuts the reset rows' graph
        return dataclasses.replace(self, memory=memory, fresh=self.fresh | rows)


@MEMORIES.register("rmt")
class RMTMemory(SegmentMemory):
    carries_context = False  # the memory summarises earlier segments; it cannot stand in for their tokens
    backpropagates_through_state = True  # `bptt_depth` segments per gradient window
    options = {"num_memory_tokens": option(0, NON_NEGATIVE)}

    def __init__(self, config) -> None:
        super().__init__(config)
        count = config.num_memory_tokens
        self.is_decoder: bool = bool(config.is_decoder)
        # an Embedding, so the model's `_init_weights` initialises it like the token embeddings
        self.initial = nn.Embedding(count, config.hidden_size) if count > 0 else None

    @classmethod
    def check_config(cls, config) -> None:
        count = config.num_memory_tokens
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"LongLMConfig.num_memory_tokens must be a non-negative integer, got {count!r}.")
        depth = config.bptt_depth
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"LongLMConfig.bptt_depth must be a positive integer (segments per gradient window), got {depth!r}.")
        if config.mem_len:
            raise ValueError(
                f"Memory 'rmt' carries its state in memory tokens and does not combine with a cache of past "
                f"states; set mem_len=0 (got {config.mem_len!r})."
            )

    @property
    def num_tokens(self) -> int:
        return 0 if self.initial is None else self.initial.num_embeddings

    def _read_memory(self, state: RMTMemoryState | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        learned = self.initial.weight.to(like.dtype)[None].expand(batch, -1, -1)
        if state is None:
            return learned
        return torch.where(state.fresh.to(like.device)[:, None, None], learned, state.memory.to(like.dtype))

    def extend_inputs(
        self, state: RMTMemoryState | None, hidden: torch.Tensor, document_starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int, int]:
        """Decoder rows where a document starts inside the segment get write slots holding the learned initial
        memory, not the read memory: what they write then comes from a fresh memory and the new document
        only (the model's document mask keeps the slots to the row's last document)."""
        count = self.num_tokens
        if count == 0:
            return hidden, 0, 0
        read = self._read_memory(state, hidden.shape[0], hidden)
        if self.is_decoder:
            write = read
            if document_starts is not None and bool(document_starts.any()):
                starts_here = document_starts.bool().any(dim=1).to(hidden.device)[:, None, None]
                write = torch.where(starts_here, self._read_memory(None, hidden.shape[0], hidden), read)
            return torch.cat([read, hidden, write], dim=1), count, count
        return torch.cat([read, hidden], dim=1), count, 0

    def update(self, state: RMTMemoryState | None, segment: SegmentPass) -> RMTMemoryState | None:
        count = self.num_tokens
        if count == 0:
            return None
        if state is not None and state.frozen:
            return state
        final = segment.final_hidden
        written = final[:, final.shape[1] - count :] if self.is_decoder else final[:, :count]
        fresh = torch.zeros(final.shape[0], dtype=torch.bool, device=final.device)
        return RMTMemoryState(written, fresh)

    def generation_memory(self, state: RMTMemoryState | None, batch_size: int) -> RMTMemoryState | None:
        """The state every generation step reads: the caller's memory (or the learned one), frozen."""
        if self.num_tokens == 0:
            return None
        if state is None:
            weight = self.initial.weight
            memory = weight.new_zeros(batch_size, self.num_tokens, weight.shape[1])
            state = RMTMemoryState(memory, torch.ones(batch_size, dtype=torch.bool, device=weight.device))
        return state if state.frozen else dataclasses.replace(state, frozen=True)

    def state_from_dict(self, data: dict[str, Any]) -> RMTMemoryState:
        return RMTMemoryState(data["memory"], data["fresh"].bool(), bool(data.get("frozen", False)))
