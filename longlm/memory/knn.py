"""`knn`: the Memorizing Transformer's memory (Wu et al. 2022): an XL cache plus a kNN store.

- With `mem_len > 0`, every layer keeps the Transformer-XL cache of its last `mem_len` inputs (this class
  *is* an `XLMemory`; the cache behaves exactly as `memory="xl"`).
- Each `knn` layer (`config.knn_layers`) also has, per batch row, a store of the (unit key, value) pairs of
  up to `knn_memory_size` past tokens (oldest dropped first) with a validity mask. The store holds no
  gradient. It is handed to the layer's `knn` mixer as `MixerInputs.payload` (a `KNNStore`).

After a segment, `update` appends the segment's pairs of every knn layer; padded tokens (token_mask 0) are
stored as invalid slots. The pairs are those the knn mixer computed for the segment (`segment_entries`,
detached): recomputing them here from `SegmentPass.layer_inputs` would miss the block's pre-norm
(`pre_norm=True` feeds the mixer `mixer_norm(layer_input)`, and the norm belongs to the block, which a
memory cannot see), so the mixer hands over what it actually used.

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

from longlm.attention.knn import KNNStore, check_knn_fields
from longlm.memory.base import SegmentPass
from longlm.memory.registry import MEMORIES
from longlm.memory.xl import XLMemory, XLMemoryState


@dataclasses.dataclass
class KNNMemoryState(XLMemoryState):
    """XL fields plus, per knn layer j (in `config.knn_layers` order), `keys[j]`/`values[j]` (B, H, S, Dh)
    and one `store_valid` (B, S) shared by the knn layers (they store the same tokens)."""

    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()
    store_valid: torch.Tensor | None = None

    def reset_rows(self, rows: torch.Tensor) -> "KNNMemoryState":
        state = super().reset_rows(rows)
        if self.store_valid is None:
            return state
        keep = ~rows.to(device=self.store_valid.device, dtype=torch.bool)
        scale = keep[:, None, None, None]
        return dataclasses.replace(
            state,
            keys=tuple(k * scale.to(k.dtype) for k in self.keys),
            values=tuple(v * scale.to(v.dtype) for v in self.values),
            store_valid=self.store_valid & keep[:, None],
        )

    def store(self, position: int) -> KNNStore | None:
        if self.store_valid is None or self.store_valid.shape[1] == 0:
            return None
        return KNNStore(self.keys[position], self.values[position], self.store_valid)


def _append_last(old: torch.Tensor | None, new: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """The last `size` entries of [old; new] along `dim`, as a fresh tensor (no view of a larger buffer)."""
    new = new.detach()
    if new.shape[dim] >= size or old is None or old.shape[dim] == 0:
        return new.narrow(dim, new.shape[dim] - min(size, new.shape[dim]), min(size, new.shape[dim])).clone()
    keep = min(old.shape[dim], size - new.shape[dim])
    return torch.cat([old.narrow(dim, old.shape[dim] - keep, keep), new], dim=dim)


@MEMORIES.register("knn")
class KNNMemory(XLMemory):
    @classmethod
    def check_config(cls, config) -> None:
        if not config.knn_layers:
            raise ValueError(
                "memory='knn' needs at least one knn layer to fill its store; set knn_layers (e.g. [9] for layer 9)."
            )
        check_knn_fields(config)

    @property
    def knn_layers(self) -> list[int]:
        return list(self.config.knn_layers or [])

    def mixer_payload(self, state: KNNMemoryState | None, layer_idx: int) -> KNNStore | None:
        if state is None or layer_idx not in self.knn_layers:
            return None
        return state.store(self.knn_layers.index(layer_idx))

    def update(self, state: KNNMemoryState | None, segment: SegmentPass) -> KNNMemoryState:
        xl = super().update(state, segment)
        batch, length = segment.layer_inputs[0].shape[:2]
        device = segment.layer_inputs[0].device
        size = self.config.knn_memory_size
        new_valid = (
            torch.ones(batch, length, dtype=torch.bool, device=device) if segment.token_mask is None else segment.token_mask.bool()
        )
        previous = state if state is not None and state.store_valid is not None else None
        previous_valid = None if previous is None else previous.store_valid
        if segment.document_starts is not None:  # keep only the pairs of each row's last document
            document = segment.document_starts.long().cumsum(dim=1)
            new_valid = new_valid & (document == document[:, -1:])
            if previous_valid is not None:
                previous_valid = previous_valid & (document[:, -1:] == 0)
        keys, values = [], []
        for position, layer_idx in enumerate(self.knn_layers):
            mixer = segment.mixers[layer_idx]
            entries = getattr(mixer, "segment_entries", None)
            if entries is None:
                raise RuntimeError(f"Layer {layer_idx}'s mixer handed no (key, value) pairs; the knn memory needs the knn mixer there.")
            mixer.segment_entries = None  # handed over once; the store holds them now
            new_keys, new_values = entries
            keys.append(_append_last(None if previous is None else previous.keys[position], new_keys, size, dim=2))
            values.append(_append_last(None if previous is None else previous.values[position], new_values, size, dim=2))
        store_valid = _append_last(previous_valid, new_valid, size, dim=1)
        fields = {f.name: getattr(xl, f.name) for f in dataclasses.fields(XLMemoryState)}
        return KNNMemoryState(**fields, keys=tuple(keys), values=tuple(values), store_valid=store_valid)

    def state_from_dict(self, data: dict[str, Any]) -> KNNMemoryState:
        xl = super().state_from_dict(data)
        fields = {f.name: getattr(xl, f.name) for f in dataclasses.fields(XLMemoryState)}
        return KNNMemoryState(
            **fields, keys=tuple(data.get("keys", ())), values=tuple(data.get("values", ())), store_valid=data.get("store_valid")
        )
