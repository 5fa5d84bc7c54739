"""`knn`: the Memorizing Transformer's memory (Wu et al. 2022): an XL cache plus a kNN store.

- With `mem_len > 0`, every layer keeps the Transformer-XL cache of its last `mem_len` inputs (this class
  *is* an `XLMemory`; the cache behaves exactly as `memory="xl"`).
- Each `knn` layer (the layers whose `config.layer_mixers` entry is `knn`) also has, per batch row, a store of the (unit key, value) pairs of
  up to `knn_memory_size` past tokens (oldest dropped first) with a validity mask. The store holds no
  gradient. It is handed to the layer's `knn` mixer as `MixerInputs.payload` (a `KNNStore`).

After a segment, `update` appends the segment's pairs of every knn layer; padded tokens (token_mask 0) are
stored as invalid slots. The pairs are those the knn mixer computed for the segment (its `KNNEntries`
write, `SegmentPass.writes`, detached): recomputing them here from `SegmentPass.layer_inputs` would miss the block's pre-norm
(`pre_norm=True` feeds the mixer `mixer_norm(layer_input)`, and the norm belongs to the block, which a
memory cannot see), so the mixer hands over what it actually used.

Generation: prompt and generated tokens are one segment fed a step at a time (`SegmentPass.segment_ends`
False). Their pairs are held back (`pending_*`) and join the store when the segment ends (the next plain
forward's `begin_segment`), so a token of the segment is attended through the XL cache only, as in one
forward over the whole segment, and never retrieved a second time from the store.

Documents: `reset_rows` empties the store (and XL cache) of the rows given, nothing else; the training and
evaluation loops call it when a row's segment starts a new document (`memory_for_segment`). A document that
begins *inside* a segment (`SegmentPass.document_starts`, from the model's `document_starts`) is handled
exactly too: the knn mixer stops retrieving for the tokens from that start on, and `update` stores only the
pairs from the row's last start on, dropping the earlier store. (The XL cache keeps segment granularity.)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from longlm.attention.knn import KNNEntries, KNNStore, check_knn_fields
from longlm.memory.base import SegmentPass
from longlm.memory.registry import MEMORIES
from longlm.options import POSITIVE, is_str, option
from longlm.memory.xl import XLMemory, XLMemoryState


@dataclasses.dataclass
class KNNMemoryState(XLMemoryState):
    """XL fields plus, per knn layer j (in layer order), `keys[j]`/`values[j]` (B, H, S, Dh)
    and one `store_valid` (B, S) shared by the knn layers (they store the same tokens)."""

    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()
    store_valid: torch.Tensor | None = None
    # the pairs of a segment still being fed (generate's steps), committed to the store when it ends
    pending_keys: tuple[torch.Tensor, ...] = ()
    pending_values: tuple[torch.Tensor, ...] = ()
    pending_valid: torch.Tensor | None = None

    def reset_rows(self, rows: torch.Tensor) -> "KNNMemoryState":
        state = super().reset_rows(rows)
        for keys, values, valid in (("keys", "values", "store_valid"), ("pending_keys", "pending_values", "pending_valid")):
            if getattr(self, valid) is None:
                continue
            keep = ~rows.to(device=getattr(self, valid).device, dtype=torch.bool)
            scale = keep[:, None, None, None]
            state = dataclasses.replace(
                state,
                **{
                    keys: tuple(k * scale.to(k.dtype) for k in getattr(self, keys)),
                    values: tuple(v * scale.to(v.dtype) for v in getattr(self, values)),
                    valid: getattr(self, valid) & keep[:, None],
                },
            )
        return state

    def store(self, position: int) -> KNNStore | None:
        if self.store_valid is None or self.store_valid.shape[1] == 0:
            return None
        return KNNStore(self.keys[position], self.values[position], self.store_valid)


def knn_layers(config) -> list[int]:
    """The layers whose mixer is `knn` (they fill and read the store)."""
    return config.layers_with("knn")


def _append_last(old: torch.Tensor | None, new: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """The last `size` entries of [old; new] along `dim`, as a fresh tensor (no view of a larger buffer)."""
    new = new.detach()
    if new.shape[dim] >= size or old is None or old.shape[dim] == 0:
        return new.narrow(dim, new.shape[dim] - min(size, new.shape[dim]), min(size, new.shape[dim])).clone()
    keep = min(old.shape[dim], size - new.shape[dim])
    return torch.cat([old.narrow(dim, old.shape[dim] - keep, keep), new], dim=dim)


@MEMORIES.register("knn")
class KNNMemory(XLMemory):
    # how the knn mixers search the store (read by them); the store's size is fixed at construction
    reconfigurable_options = ("knn_top_k", "knn_backend")
    options = {
        "knn_memory_size": option(65536, POSITIVE),  # (key, value) pairs per row and knn layer
        "knn_top_k": option(32, POSITIVE),
        "knn_backend": option("torch", (is_str, "a kNN backend name")),
    }
    @classmethod
    def check_config(cls, config) -> None:
        if not knn_layers(config):
            raise ValueError(
                "memory='knn' needs at least one knn layer to fill its store; set layer_mixers with 'knn' in at least "
                "one layer, for example layer_mixers=['relative', 'knn']."
            )
        check_knn_fields(config)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.knn_layers: list[int] = knn_layers(config)  # read once: the layer structure never changes
        self.store_size: int = config.knn_memory_size

    @classmethod
    def required_write(cls, config, layer_idx: int) -> type | None:
        return KNNEntries if layer_idx in knn_layers(config) else None

    def mixer_payload(self, state: KNNMemoryState | None, layer_idx: int) -> KNNStore | None:
        if state is None or layer_idx not in self.knn_layers:
            return None
        return state.store(self.knn_layers.index(layer_idx))

    def begin_segment(self, state: KNNMemoryState | None) -> KNNMemoryState | None:
        """A new segment retrieves from everything before it: the held-back pairs join the store."""
        if not isinstance(state, KNNMemoryState) or state.pending_valid is None:
            return state
        size = self.store_size
        return dataclasses.replace(
            state,
            keys=tuple(_append_last(old, new, size, dim=2) for old, new in _per_layer(state.keys, state.pending_keys)),
            values=tuple(_append_last(old, new, size, dim=2) for old, new in _per_layer(state.values, state.pending_values)),
            store_valid=_append_last(state.store_valid, state.pending_valid, size, dim=1),
            pending_keys=(),
            pending_values=(),
            pending_valid=None,
        )

    def update(self, state: KNNMemoryState | None, segment: SegmentPass) -> KNNMemoryState:
        """The segment's pairs are held back (`pending_*`) while the segment goes on, so its own tokens are
        attended through the XL cache only, as one forward over the whole segment would; they join the store
        when it ends (`segment_ends`, or the next segment's `begin_segment`)."""
        xl = super().update(state, segment)
        batch, length = segment.layer_inputs[0].shape[:2]
        device = segment.layer_inputs[0].device
        new_valid = (
            torch.ones(batch, length, dtype=torch.bool, device=device) if segment.token_mask is None else segment.token_mask.bool()
        )
        store_valid = None if state is None else state.store_valid
        pending_valid = None if state is None else state.pending_valid
        if segment.document_starts is not None:  # keep only the pairs of each row's last document
            document = segment.document_starts.long().cumsum(dim=1)
            new_valid = new_valid & (document == document[:, -1:])
            no_start = document[:, -1:] == 0
            store_valid = None if store_valid is None else store_valid & no_start
            pending_valid = None if pending_valid is None else pending_valid & no_start
        new_keys, new_values = [], []
        layout = segment.layout  # the mixer saw the padded batch packed; the pairs go back to the segment's order
        for layer_idx in self.knn_layers:
            entries: KNNEntries = segment.writes[layer_idx]
            new_keys.append(entries.keys if layout is None else layout.unpack(entries.keys, dim=2))
            new_values.append(entries.values if layout is None else layout.unpack(entries.values, dim=2))
        fields = {f.name: getattr(xl, f.name) for f in dataclasses.fields(XLMemoryState)}
        old = {"keys": (), "values": ()} if state is None else {"keys": state.keys, "values": state.values}
        held = {"keys": (), "values": ()} if state is None else {"keys": state.pending_keys, "values": state.pending_values}
        merged = KNNMemoryState(
            **fields,
            keys=old["keys"],
            values=old["values"],
            store_valid=store_valid,
            pending_keys=tuple(n if h is None else torch.cat([h, n], dim=2) for h, n in _per_layer(held["keys"], new_keys)),
            pending_values=tuple(n if h is None else torch.cat([h, n], dim=2) for h, n in _per_layer(held["values"], new_values)),
            pending_valid=new_valid if pending_valid is None else torch.cat([pending_valid, new_valid], dim=1),
        )
        return self.begin_segment(merged) if segment.segment_ends else merged

    def state_from_dict(self, data: dict[str, Any]) -> KNNMemoryState:
        xl = super().state_from_dict(data)
        fields = {f.name: getattr(xl, f.name) for f in dataclasses.fields(XLMemoryState)}
        return KNNMemoryState(
            **fields,
            keys=tuple(data.get("keys", ())),
            values=tuple(data.get("values", ())),
            store_valid=data.get("store_valid"),
            pending_keys=tuple(data.get("pending_keys", ())),
            pending_values=tuple(data.get("pending_values", ())),
            pending_valid=data.get("pending_valid"),
        )


def _per_layer(held: tuple[torch.Tensor, ...], new) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """(held, new) per knn layer; held is None for every layer when nothing is held."""
    return list(zip(held, new)) if held else [(None, n) for n in new]
