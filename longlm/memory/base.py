"""The memory plug point: state carried from one segment to the next, like HF's `past_key_values`."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from longlm.options import Option

if TYPE_CHECKING:
    from longlm.attention.base import ContentProjections
    from longlm.layers.packing import PackedRows
    from longlm.configuration_longlm import LongLMConfig


def last_document_tokens(document_starts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True at and after each row's last document start (everywhere for a row without one), the
    only tokens whose states a memory may carry past the segment."""
    numbers = document_starts.long().cumsum(dim=1)
    return numbers == numbers[:, -1:]


@dataclasses.dataclass
class SegmentPass:
    """What a memory may read after a segment to write the next state.

    `layer_inputs[i]` is the input of layer i and `final_hidden` the output after the final norm, both
    over the whole (possibly extended, see `SegmentMemory.extend_inputs`) sequence; `token_mask` (B, L)
    marks real tokens of the segment; `writes[i]` is what layer i's mixer handed over (`MixerOutput.memory_write`:
    the kNN pairs, ...; None for mixers that write nothing, and for every layer of a reversible stack);
    `projections[i]` are layer i's detached q/k/v projections (`TokenMixer.content_projections`), filled only
    for a memory with `needs_projections` (the compressive reconstruction loss); `document_starts` (B, L') marks the
    tokens of the (extended) sequence that begin a new document, or is None. `segment_ends` is False while
    more tokens of the same segment follow in later calls (generate's steps after the prompt): a memory
    that writes a segment's tokens somewhere they are *retrieved* from (knn) holds them back until it ends.
    Everything here is in the segment's own order; `layout` is how the layers saw it when the batch was
    padded (`longlm.layers.packing`: real positions first), for what a mixer computed in that order.
    """

    layer_inputs: list[torch.Tensor]
    final_hidden: torch.Tensor
    token_mask: torch.Tensor | None
    writes: Sequence[Any] = ()
    projections: Sequence["ContentProjections | None"] = ()
    document_starts: torch.Tensor | None = None
    segment_ends: bool = True
    layout: "PackedRows | None" = None


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

    Per segment the skeleton asks it, in order:
    1. `extend_inputs`: tokens to add around the segment (RMT's read/write memory tokens);
    2. per layer, `context` (hidden states attended as extra keys/values) and `mixer_payload`;
    3. after the last layer, `update` (the next state) and, in training, `auxiliary_losses`.
    `carries_context` says whether a forward over only the new tokens plus the state equals a forward
    over the whole sequence so far (true for `xl` within `mem_len`); `generate()` uses it to decide what
    to feed, and `allows_kv_cache` whether it may cache the mixers' keys/values instead.
    """

    carries_context: bool = False
    # generate() may cache the mixers' keys/values (`longlm.attention.kv_cache`) when the memory adds no
    # state of its own that each step would have to read
    allows_kv_cache: bool = False
    # the number of states it keeps is `mem_len` (an evaluation may change it: `model.with_memory(mem_len=...)`)
    sized_by_mem_len: bool = False
    # its own options that `model.with_memory(...)` may change after construction (besides mem_len & co.)
    reconfigurable_options: tuple[str, ...] = ()
    # its state keeps the graph between segments, so `bptt_depth` > 1 backpropagates through it (the others
    # detach what they carry)
    backpropagates_through_state: bool = False
    # config options this memory reads (name -> `longlm.options.Option`), set on every `LongLMConfig`
    options: dict[str, Option] = {}

    def __init__(self, config: "LongLMConfig") -> None:
        super().__init__()
        self.mem_len: int = config.mem_len
        self.configure(config)

    def configure(self, config: "LongLMConfig") -> None:
        """Read the settings an evaluation may change (`mem_len`, `reconfigurable_options`): at construction and
        again through `model.with_memory(...)`, never during a forward. Raises when this memory cannot take them."""
        self.mem_len = config.mem_len

    @classmethod
    def check_config(cls, config: "LongLMConfig") -> None:
        """Validate the config fields this memory reads (one clear sentence per bad field)."""

    @classmethod
    def needs_projections(cls, config: "LongLMConfig") -> bool:
        """Whether this memory reads `SegmentPass.projections` (every layer's q/k/v projections); the config
        check then refuses mixers without `TokenMixer.provides_projections`."""
        return False

    @classmethod
    def required_write(cls, config: "LongLMConfig", layer_idx: int) -> type | None:
        """The `MixerOutput.memory_write` type this memory reads from layer `layer_idx` (None: nothing); the
        config check refuses a layer whose mixer does not write it."""
        return None

    def extend_inputs(
        self, state: MemoryState | None, hidden: torch.Tensor, document_starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int, int]:
        """(extended hidden states, tokens added before the segment, tokens added after it). `document_starts`
        (B, L) or None: tokens added after a row's last document start must hold nothing from before it."""
        return hidden, 0, 0

    def context(self, state: MemoryState | None, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden states to prepend (B, M, D) or None, their validity mask (B, M) or None)."""
        return None, None

    def known_valid_mask(self, state: MemoryState | None) -> torch.Tensor | None:
        """The (B, M) validity mask, or None when every slot is known (on the host) to be valid, so the
        model can skip masking without a device-to-host sync."""
        return self.context(state, 0)[1]

    def check_padding(self, state: MemoryState | None, attention_mask: torch.Tensor | None) -> None:
        """Raise (one sentence) when this memory cannot give a padded row what the row alone gets; called only
        for a padded batch. Default: every memory can."""

    def begin_segment(self, state: MemoryState | None) -> MemoryState | None:
        """The state a new segment starts from (called unless the forward continues the previous call's
        segment): what a memory held back for the segment before is committed now. Default: unchanged."""
        return state

    def mixer_payload(self, state: MemoryState | None, layer_idx: int) -> Any:
        """Extra state handed to layer `layer_idx`'s mixer as `MixerInputs.payload`."""
        return None

    def update(self, state: MemoryState | None, segment: SegmentPass) -> MemoryState | None:
        return None

    def auxiliary_losses(self, state: MemoryState | None, segment: SegmentPass) -> dict[str, torch.Tensor]:
        """Losses that train the memory's own parameters (named; logged separately; added to `loss`)."""
        return {}

    def generation_memory(self, state: MemoryState | None, batch_size: int) -> MemoryState | None:
        """For memories that do not carry the context: the state each `generate()` step reads while the
        whole sequence is fed again (RMT: the caller's read memory, frozen). Default: none."""
        return None

    def state_from_dict(self, data: dict[str, Any]) -> MemoryState | None:
        return None
