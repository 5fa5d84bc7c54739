"""Padding moved out of the way: every row's real positions first, in order, padding after them.

Why: a pattern that counts positions from the start of the sequence (fixed blocks, buckets of rotated
vectors, memory tokens around the text, absolute positions) then counts them from each row's first
real token, so a padded row computes exactly what the row alone computes. The skeleton packs the extended
sequence before the layers and unpacks what they return; nothing mechanism-specific is involved.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """`order[b, p]` is the original position that packed position p of row b holds; `inverse` undoes it."""

    order: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def for_mask(cls, valid: torch.Tensor) -> "PackedRows | None":
        """The packing for a (B, T) validity mask, or None when every row already has its real positions first."""
        valid = valid.bool()
        if not bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            return None
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        return cls(order, torch.argsort(order, dim=1))

    @staticmethod
    def _gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[0], shape[dim] = index.shape
        index = index.view(shape).expand(*[s if i != dim else -1 for i, s in enumerate(x.shape)])
        return x.gather(dim, index)

    def pack(self, x: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
        return None if x is None else self._gather(x, self.order.to(x.device), dim)

    def unpack(self, x: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
        return None if x is None else self._gather(x, self.inverse.to(x.device), dim)
