"""Ranks inside groups of a sorted layout (LSH buckets, routing clusters): what the causal patterns count."""
from __future__ import annotations

import torch


def ranks_in_sorted_groups(sorted_groups: torch.Tensor) -> torch.Tensor:
    """(..., n) group of each slot, slots sorted by (group, position) -> each slot's rank in its group (the
    number of earlier slots of the same group)."""
    slots = torch.arange(sorted_groups.shape[-1], device=sorted_groups.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[..., 1:] = sorted_groups[..., 1:] != sorted_groups[..., :-1]
    return slots - torch.cummax(torch.where(starts, slots, 0), dim=-1).values


def ranks_in_order(sorted_groups: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The same ranks, back in token order (`order[..., a]` is the token at slot a)."""
    return torch.zeros_like(order).scatter_(-1, order, ranks_in_sorted_groups(sorted_groups))
