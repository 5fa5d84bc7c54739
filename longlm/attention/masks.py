"""Boolean attention masks (True = may attend) for a segment that attends [memory; segment]."""
from __future__ import annotations

import torch

from longlm.attention.documents import same_document


def segment_attention_mask(
    query_length: int,
    memory_length: int,
    *,
    causal: bool,
    key_mask: torch.Tensor | None = None,
    same_length_window: int | None = None,
    documents: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Mask of shape (B or 1, 1, L, M + L), or None when every key is visible to every query.

    Query i sits at key position `memory_length + i`. Causal: keys j <= M + i. `same_length_window`
    (Transformer-XL's `same_length`) additionally limits each query to its last `window` keys, so every
    query sees the same number of keys. `documents` (B, M + L), `MixerInputs.documents`: a query sees only
    keys of its own document. A query always sees itself, so no row is ever fully masked.
    """
    key_length = memory_length + query_length
    if not causal and key_mask is None and documents is None:
        return None
    query_pos = torch.arange(query_length, device=device)[:, None] + memory_length
    key_pos = torch.arange(key_length, device=device)[None, :]
    allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    if causal:
        allowed = key_pos <= query_pos
        if same_length_window:
            allowed = allowed & (key_pos > query_pos - same_length_window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
        allowed = allowed | (key_pos == query_pos)[None, None]
    if documents is not None:
        allowed = allowed & same_document(documents[:, -query_length:], documents)[:, None]
    return allowed


def mask_to_bias(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive form of a boolean mask: 0 where allowed, the dtype's most negative value elsewhere."""
    if allowed is None:
        return None
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)
