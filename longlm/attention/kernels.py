"""One attention call for all mixers: flash-attn when importable and applicable, otherwise PyTorch SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: `pip install longlm[flash]` on a CUDA machine
    from flash_attn import flash_attn_func
except ImportError:  # the SDPA path always works
    flash_attn_func = None


def flash_attention_usable(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    causal: bool,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v for q (B, H, L, Dh) and k, v (B, H, K, Dh).

    `mask` is boolean (True = attend) or None; `causal` with `mask=None` means the bottom-right aligned
    causal pattern (query i sees keys up to K - L + i), which is what flash-attn and SDPA provide natively.
    """
    query_length, key_length = q.shape[-2], k.shape[-2]
    if mask is None and bias is None and flash_attention_usable(q):
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, softmax_scale=scale, causal=causal
        )
        return out.transpose(1, 2)
    if mask is None and bias is None and causal and query_length == key_length:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    if causal and mask is None:
        offset = key_length - query_length
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=q.device).tril(offset)
    attn_mask = mask
    if bias is not None:
        attn_mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
