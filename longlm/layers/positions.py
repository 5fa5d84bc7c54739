"""Positional schemes: sinusoidal tables (for relative positions, Dai et al. 2019) and rotary embeddings."""
from __future__ import annotations

import torch


def sinusoid_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(p * f), cos(p * f)] for each position p, with the frequencies of Dai et al. 2019: (P, dim)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, dim) for rotary embeddings in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) by position-dependent angles (cos/sin broadcast over B and H)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def rotate_at(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of (B, H, L, Dh) at per-row positions (B, L) (a cached step: rows may sit at different
    positions, e.g. after left padding)."""
    batch, length = positions.shape
    cos, sin = rotary_cos_sin(positions.reshape(-1), x.shape[-1], theta)
    return apply_rotary(x, cos.view(batch, 1, length, -1), sin.view(batch, 1, length, -1))


class RotaryTable:
    """cos/sin tables of positions 0..n-1, computed once per forward (by the skeleton, for the longest key
    sequence any layer attends) and sliced by every layer, instead of once per layer."""

    def __init__(self, length: int, dim: int, theta: float, device: torch.device) -> None:
        self.dim, self.theta = dim, theta
        self.cos, self.sin = rotary_cos_sin(torch.arange(length, device=device), dim, theta)

    def first(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:length], self.sin[:length]


def rotary_for(
    table: RotaryTable | None, length: int, dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions 0..length-1: from the forward's shared table when it covers them (a mixer called on
    its own, as in unit tests, computes them)."""
    if table is not None and table.dim == dim and table.theta == theta and table.cos.shape[0] >= length:
        return table.first(length)
    return rotary_cos_sin(torch.arange(length, device=device), dim, theta)
