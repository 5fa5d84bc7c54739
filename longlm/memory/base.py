"""The memory plug point: state carried from one segment to the next, like HF's `past_key_values`."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from longlm.configuration_longlm import LongLMConfig


@dataclasses.dataclass
class MemoryState:
    """Base of every memory state: a dataclass of tensors (or tuples of tensors) with a leading batch axis.

    Generic helpers (`detach`, `select_rows`, `to`, `to_dict`) map over the tensor fields; a subclass
    defines what resetting a row means.
    """

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MemoryState":
        def apply(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return fn(value)
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            return value

        return dataclasses.replace(self, **{f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def detach(self) -> "MemoryState":
        """Stop gradients at the segment boundary."""
        return self.map_tensors(torch.Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> "MemoryState":
        return self.map_tensors(lambda t: t.to(*args, **kwargs))

    def select_rows(self, index: torch.Tensor) -> "MemoryState":
        """Reorder/select batch rows (beam search, dropping finished streams)."""
        return self.map_tensors(lambda t: t.index_select(0, index.to(t.device)))

    def reset_rows(self, rows: torch.Tensor) -> "MemoryState":
        """Forget everything for the rows where `rows` (B,) is True; other rows are untouched."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints (loadable with `torch.load(weights_only=True)`)."""
        return {"type": type(self).__name__, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


class SegmentMemory(nn.Module):
    """Base class of the memories registered in `longlm.memory.MEMORIES`.

    The skeleton asks it, per layer, for the context to attend (`context`), and after the segment hands it
    every layer's input so it can write the next state (`update`). `carries_context` says whether a
    forward over only the new tokens plus the state equals a forward over the whole sequence so far
    (true for `xl` within `mem_len`); `generate()` uses it to decide what to feed.
    """

    carries_context: bool = False

    def __init__(self, config: "LongLMConfig") -> None:
        super().__init__()
        self.config = config

    def context(self, state: MemoryState | None, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden states to prepend (B, M, D) or None, their validity mask (B, M) or None)."""
        return None, None

    def known_valid_mask(self, state: MemoryState | None) -> torch.Tensor | None:
        """The (B, M) validity mask, or None when every slot is known (on the host) to be valid, so the
        model can skip masking without a device-to-host sync."""
        return self.context(state, 0)[1]

    def update(
        self, state: MemoryState | None, layer_inputs: list[torch.Tensor], token_mask: torch.Tensor | None
    ) -> MemoryState | None:
        return None

    def state_from_dict(self, data: dict[str, Any]) -> MemoryState | None:
        return None
