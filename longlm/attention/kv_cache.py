"""The incremental-decoding cache of `generate()` for a model without a segment memory (`memory="none"`).

A mixer that can attend its pattern from cached keys/values (`TokenMixer.supports_kv_cache`) gets a
`CacheSlot` in `MixerInputs.cache`: the keys/values earlier calls cached for its layer (rotary already
applied) and where the current tokens sit. It attends [cached; new] with its own pattern as a dense mask
over one row of keys per query (`CacheSlot.mask`) and writes back what the next call needs
(`CacheSlot.write`, keeping only the last `span` positions for a windowed pattern). So a generated token
costs O(cached keys) attention, never a forward over the whole sequence, and gets exactly what one forward
over prompt + generated tokens gives it.

Every slot carries its own absolute position (real tokens counted from the row's first, as packed
forwards count them), validity and document number, so padded rows, document starts and a rolling window
need no shared layout across rows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from longlm.attention.backends import attend
from longlm.layers.positions import rotate_at
from longlm.memory.base import MemoryState

# pattern(query_positions (B, L, 1), key_positions (B, 1, K)) -> (B, [H,] L, K) bool, before causality,
# validity and documents are applied
Pattern = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class LayerKV:
    """One layer's cache: keys/values (B, H, T, Dh), and per slot its position, validity and document (B, T).

    `extras` are whatever else the mixer's pattern needs per cached slot (slots on the last axis, batch
    first), e.g. LSH buckets and ranks."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    documents: torch.Tensor
    extras: tuple[torch.Tensor, ...] = ()


@dataclasses.dataclass
class CacheSlot:
    """What one layer's mixer reads and writes during a cached forward (module docstring).

    `past` is None on the first call (the prompt). `positions`, `valid`, `documents` (B, L) describe the
    call's tokens in the order the mixer sees them. `written` is set by the mixer through `write`.
    """

    past: LayerKV | None
    positions: torch.Tensor
    valid: torch.Tensor
    documents: torch.Tensor
    written: LayerKV | None = None

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cached; new] keys and values (B, H, T + L, Dh)."""
        if self.past is None:
            return k, v
        return torch.cat([self.past.keys, k], dim=2), torch.cat([self.past.values, v], dim=2)

    def _all(self, name: str) -> torch.Tensor:
        new = getattr(self, name)
        return new if self.past is None else torch.cat([getattr(self.past, name), new], dim=1)

    @property
    def key_positions(self) -> torch.Tensor:
        """(B, T + L) positions of [cached; new] keys."""
        return self._all("positions")

    def earlier_keys(self) -> torch.Tensor:
        """(B, L, T + L) bool: the valid keys of the query's document at earlier positions (itself excluded)."""
        earlier = self._all("positions")[:, None, :] < self.positions[:, :, None]
        same_document = self._all("documents")[:, None, :] == self.documents[:, :, None]
        return earlier & same_document & self._all("valid")[:, None, :]

    def extras_with(self, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """[cached; new] of each of the mixer's per-slot extras (last axis)."""
        if self.past is None:
            return new
        return tuple(torch.cat([old, fresh], dim=-1) for old, fresh in zip(self.past.extras, new))

    def mask(self, pattern: Pattern) -> torch.Tensor:
        """(B, H or 1, L, T + L) bool: the mixer's `pattern`, cut to earlier-or-same positions, valid keys and
        the query's document; a query always sees itself."""
        query_pos, key_pos = self.positions[:, :, None], self._all("positions")[:, None, :]
        allowed = (key_pos <= query_pos) & self._all("valid")[:, None, :]
        allowed = allowed & (self.documents[:, :, None] == self._all("documents")[:, None, :])
        cached = 0 if self.past is None else self.past.keys.shape[2]
        key_index = torch.arange(allowed.shape[2], device=allowed.device)[None, :]
        itself = (key_index == torch.arange(allowed.shape[1], device=allowed.device)[:, None] + cached)[None]
        shaped = pattern(query_pos, key_pos)
        if shaped.dim() == 4:  # per head
            return (allowed[:, None] & shaped) | itself[:, None]
        return ((allowed & shaped) | itself)[:, None]

    def write(
        self, keys: torch.Tensor, values: torch.Tensor, span: int | None = None, extras: tuple[torch.Tensor, ...] = ()
    ) -> None:
        """Cache [cached; new] keys/values (from `keys_values`) and extras (from `extras_with`); with `span`,
        only each row's last `span` valid positions (a rolling window: older keys can never be attended again)."""
        positions, valid, documents = self._all("positions"), self._all("valid"), self._all("documents")
        if span is not None and positions.shape[1] > span:
            order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, -span:]  # invalid first, order kept
            pick = lambda t: t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))  # noqa: E731
            keys, values = pick(keys), pick(values)
            positions, valid, documents = positions.gather(1, order), valid.gather(1, order), documents.gather(1, order)
            extras = tuple(
                extra.gather(-1, order.view(order.shape[0], *[1] * (extra.dim() - 2), -1).expand(*extra.shape[:-1], span))
                for extra in extras
            )
        self.written = LayerKV(keys.detach(), values.detach(), positions, valid, documents, tuple(extras))


def cached_step_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot: CacheSlot,
    *,
    pattern: Pattern,
    scale: float,
    rope_theta: float | None,
    span: int | None = None,
    implementation: str = "sdpa",
) -> torch.Tensor:
    """The attention of a cached step: the call's q, k, v (B, H, L, Dh) before positions (rotary at each
    token's own position when `rope_theta` is given), [cached; new] keys masked by `pattern`, and the cache
    written back (the last `span` positions only, for a windowed pattern) -> (B, H, L, Dh)."""
    if rope_theta is not None:
        q, k = rotate_at(q, slot.positions, rope_theta), rotate_at(k, slot.positions, rope_theta)
    keys, values = slot.keys_values(k, v)
    mask = slot.mask(pattern)
    slot.write(keys, values, span=span)
    return attend(q, keys, values, mask=mask, causal=False, scale=scale, implementation=implementation)


def every_earlier_key(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Full causal attention's pattern (causality itself is `CacheSlot.mask`'s)."""
    return torch.ones((), dtype=torch.bool, device=query_pos.device)


@dataclasses.dataclass
class KVCacheState(MemoryState):
    """The cache `generate()` carries between steps (module docstring): per layer keys/values and slot
    facts, plus each row's next position and current document, and `num_tokens` fed so far."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    positions: tuple[torch.Tensor, ...]
    valid: tuple[torch.Tensor, ...]
    documents: tuple[torch.Tensor, ...]
    next_position: torch.Tensor
    last_document: torch.Tensor
    num_tokens: int = 0
    extras: tuple[tuple[torch.Tensor, ...], ...] = ()

    def layer(self, index: int) -> LayerKV:
        return LayerKV(
            self.keys[index], self.values[index], self.positions[index], self.valid[index], self.documents[index],
            self.extras[index] if self.extras else (),
        )

    def reset_rows(self, rows: torch.Tensor) -> "KVCacheState":
        keep = ~rows.to(device=self.next_position.device, dtype=torch.bool)
        return dataclasses.replace(self, valid=tuple(v & keep[:, None] for v in self.valid))

    @classmethod
    def from_slots(cls, slots: list[CacheSlot], next_position: torch.Tensor, last_document: torch.Tensor, num_tokens: int):
        layers = [slot.written for slot in slots]
        if any(layer is None for layer in layers):
            raise RuntimeError("A mixer that declares supports_kv_cache did not write its cache slot.")
        return cls(
            tuple(x.keys for x in layers),
            tuple(x.values for x in layers),
            tuple(x.positions for x in layers),
            tuple(x.valid for x in layers),
            tuple(x.documents for x in layers),
            next_position,
            last_document,
            num_tokens,
            tuple(x.extras for x in layers),
        )


def cached_call_slots(
    cache: KVCacheState | None, num_layers: int, token_mask: torch.Tensor | None, starts: torch.Tensor | None, shape, device
) -> tuple[list[CacheSlot], torch.Tensor, torch.Tensor]:
    """Per-layer slots for a call's tokens (B, L) after `cache` (None: the first call), and the next
    position and document of every row after them. `token_mask` / `starts` are in the order the layers see."""
    batch, length = shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
    first_position = torch.zeros(batch, dtype=torch.long, device=device) if cache is None else cache.next_position
    first_document = torch.zeros(batch, dtype=torch.long, device=device) if cache is None else cache.last_document
    positions = first_position[:, None] + (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    documents = first_document[:, None].expand(batch, length)
    if starts is not None:
        documents = documents + starts.long().cumsum(dim=1)
    slots = [
        CacheSlot(None if cache is None else cache.layer(i), positions, valid, documents) for i in range(num_layers)
    ]
    return slots, first_position + valid.long().sum(dim=1), documents[:, -1] if length else first_document
