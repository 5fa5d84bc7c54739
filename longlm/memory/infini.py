"""`infini`: the compressive memory of Infini-attention (Munkhdalai et al. 2024).

Per `infini` layer the state holds, per batch row and head, the memory matrix M (Dk, Dv) and the normaliser
z (Dk) that the layer's mixer (`longlm.attention.infini`) retrieves from. After each segment the state adds
what each layer wrote (`InfiniWrite`, linear or delta rule): M_s = M_{s-1} + dM, z_s = z_{s-1} + dz, where a
row whose last document began inside the segment starts from zero. Its size does not grow with the context.

It does not carry the context (a forward over new tokens plus the state is not a forward over the whole
sequence: the memory is written per segment), so `generate()` feeds the whole sequence each step and every
step reads the caller's memory, frozen (`generation_memory`), as RMT's does. The state keeps the graph; the
training loop detaches it between gradient windows (`bptt_depth`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from longlm.attention.infini import InfiniWrite
from longlm.memory.base import MemoryState, SegmentMemory, SegmentPass
from longlm.memory.registry import MEMORIES


@dataclasses.dataclass
class InfiniMemoryState(MemoryState):
    """`memory[j]` (B, H, Dk, Dv) and `normaliser[j]` (B, H, Dk) of the j-th infini layer (in layer order).
    `frozen` (host-side) marks a generation state: read by every step and never advanced; a frozen state with
    no tensors is an empty memory (what generate reads when the caller passes none)."""

    memory: tuple[torch.Tensor, ...]
    normaliser: tuple[torch.Tensor, ...]
    frozen: bool = False

    def reset_rows(self, rows: torch.Tensor) -> "InfiniMemoryState":
        if not self.memory:  # an empty generation state: nothing to forget
            return self
        keep = ~rows.to(device=self.memory[0].device, dtype=torch.bool)
        return dataclasses.replace(
            self,
            memory=tuple(m * keep[:, None, None, None].to(m.dtype) for m in self.memory),
            normaliser=tuple(z * keep[:, None, None].to(z.dtype) for z in self.normaliser),
        )


def infini_layers(config) -> list[int]:
    """The layers whose mixer is `infini` (they read and write the memory)."""
    return config.layers_with("infini")


@MEMORIES.register("infini")
class InfiniMemory(SegmentMemory):
    carries_context = False
    backpropagates_through_state = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.layers = infini_layers(config)  # read once: the layer structure never changes

    @classmethod
    def check_config(cls, config) -> None:
        if not infini_layers(config):
            raise ValueError(
                "memory='infini' needs at least one layer whose mixer is 'infini' to write it; expected mixer='infini' "
                "or 'infini' in layer_mixers."
            )
        if config.mem_len:
            raise ValueError(
                f"memory='infini' keeps a fixed-size memory per layer and no cache of past states; expected mem_len=0, "
                f"got mem_len={config.mem_len!r}."
            )

    @classmethod
    def required_write(cls, config, layer_idx: int) -> type | None:
        return InfiniWrite if layer_idx in infini_layers(config) else None

    def mixer_payload(self, state: InfiniMemoryState | None, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if state is None or not state.memory or layer_idx not in self.layers:
            return None
        position = self.layers.index(layer_idx)
        return state.memory[position], state.normaliser[position]

    def update(self, state: InfiniMemoryState | None, segment: SegmentPass) -> InfiniMemoryState:
        if state is not None and state.frozen:
            return state
        memory, normaliser = [], []
        for position, layer_idx in enumerate(self.layers):
            write: InfiniWrite = segment.writes[layer_idx]
            old_m = None if state is None else state.memory[position]
            old_z = None if state is None else state.normaliser[position]
            if old_m is not None and write.restart is not None:
                kept = (~write.restart).to(old_m.dtype)
                old_m, old_z = old_m * kept[:, None, None, None], old_z * kept[:, None, None]
            memory.append(write.memory if old_m is None else old_m + write.memory)
            normaliser.append(write.normaliser if old_z is None else old_z + write.normaliser)
        return InfiniMemoryState(tuple(memory), tuple(normaliser))

    def generation_memory(self, state: InfiniMemoryState | None, batch_size: int) -> InfiniMemoryState | None:
        """The state every generation step reads: the caller's memory (none: an empty one), frozen."""
        if state is None:
            return InfiniMemoryState((), (), frozen=True)
        return state if state.frozen else dataclasses.replace(state, frozen=True)

    def state_from_dict(self, data: dict[str, Any]) -> InfiniMemoryState:
        return InfiniMemoryState(tuple(data["memory"]), tuple(data["normaliser"]), bool(data.get("frozen", False)))
