"""The one attention backend switch: which kernel every mixer runs, from `config._attn_implementation`.

Hugging Face sets that field from `from_pretrained(..., attn_implementation=...)`, `set_attn_implementation`
or the config (default: "sdpa"). What each value means here:

- "eager": plain matmul + softmax for dense patterns, the explicit (non-fused) paths of the sparse mixers
  (LSH's chunked scores, the blocked sliding window, BigBird's gathered blocks) — the reference paths;
- "sdpa" (default): PyTorch's scaled_dot_product_attention for dense patterns and inside the blocked sparse
  paths, and the fused CPU attention kernel for LSH chunks where it applies;
- "flex_attention": FlexAttention with block-sparse masks for the sliding-window and BigBird patterns
  (compiled on CUDA; eager elsewhere, a slow reference that runs forward only), SDPA for dense patterns;
- "flash_attention_2": flash-attn for unmasked dense attention in fp16/bf16 on CUDA (Hugging Face checks that
  the package is installed when it is asked for), SDPA otherwise.

One compile cache (`flex_attention_kernel`). Nothing here swallows an error: a backend that cannot run what
was asked raises.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

try:  # optional: `pip install longlm[flash]` on a CUDA machine
    from flash_attn import flash_attn_func
except ImportError:  # the SDPA path always works
    flash_attn_func = None

IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
DEFAULT = "sdpa"


def implementation_of(config: Any) -> str:
    """The attention implementation `config` asks for (Hugging Face's `_attn_implementation`; None = "sdpa")."""
    chosen = getattr(config, "_attn_implementation", None) or DEFAULT
    if chosen not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation '{chosen}' is not one longlm runs; expected one of {list(IMPLEMENTATIONS)}.")
    return chosen


def flex_attention_kernel(on_cuda: bool) -> Callable:
    """FlexAttention: compiled once per process on CUDA (the fused kernel), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if on_cuda else flex_attention


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def uses_flex(implementation: str, dropout: float) -> bool:
    """Whether a sparse mixer runs its pattern through FlexAttention (which has no attention dropout)."""
    if implementation != "flex_attention":
        return False
    if dropout > 0.0:
        raise ValueError(
            "attn_implementation='flex_attention' has no attention dropout, but attention_dropout > 0 in training; "
            "expected attention_dropout=0 or attn_implementation='sdpa'."
        )
    return True


def uses_fused_cpu_chunks(implementation: str, tensor: torch.Tensor, dropout: float) -> bool:
    """LSH's chunks through PyTorch's fused CPU attention kernel: "sdpa" on CPU, no dropout, a supported dtype."""
    return (
        implementation != "eager"
        and dropout == 0.0
        and _fused_cpu is not None
        and tensor.device.type == "cpu"
        and tensor.dtype in (torch.float32, torch.float64, torch.bfloat16)
    )


# PyTorch's fused CPU attention kernel and its backward, which return the log-sum-exp LSH combines rounds with
_fused_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_fused_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def fused_cpu_attention(q, k, v, bias, scale: float):
    """(out, logsumexp) of the fused CPU kernel (callers check `uses_fused_cpu_chunks` first)."""
    return _fused_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)


def fused_cpu_attention_backward(grad_out, q, k, v, out, lse, bias, scale: float):
    return _fused_cpu_backward(grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)


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
    implementation: str = DEFAULT,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v for q (B, H, L, Dh) and k, v (B, H, K, Dh).

    `mask` is boolean (True = attend) or None; `causal` with `mask=None` means the bottom-right aligned
    causal pattern (query i sees keys up to K - L + i), which is what flash-attn and SDPA provide natively.
    """
    query_length, key_length = q.shape[-2], k.shape[-2]
    usable_flash = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if implementation == "flash_attention_2" and mask is None and bias is None and usable_flash:
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, softmax_scale=scale, causal=causal
        )
        return out.transpose(1, 2)
    if implementation != "eager" and mask is None and bias is None and causal and query_length == key_length:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    if causal and mask is None:
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=q.device).tril(key_length - query_length)
    if implementation == "eager":
        return _eager(q, k, v, mask, bias, dropout, q.shape[-1] ** -0.5 if scale is None else scale)
    attn_mask = mask
    if bias is not None:
        attn_mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)


def _eager(q, k, v, mask, bias, dropout: float, scale: float) -> torch.Tensor:
    """The reference: scores, mask, softmax, dropout, weighted sum (rows with no visible key give zeros)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if mask is not None:
        weights = weights * mask
    return torch.matmul(F.dropout(weights, p=dropout) if dropout else weights, v)
