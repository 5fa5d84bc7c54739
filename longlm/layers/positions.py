"""Positional schemes: sinusoidal tables (Transformer-XL relative positions) and rotary embeddings."""
from __future__ import annotations

import torch


def sinusoid_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(p * f), cos(p * f)] for each position p, with Transformer-XL's frequencies: (P, dim)."""
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
