"""Banded (sliding-window) softmax attention in memory linear in the sequence length.

Dense definition, for q, k, v of shape (B, H, L, Dh), one-sided width w and dilation d (per head):
query i may attend key j iff

    j == i                                   (a query always sees itself), or
    key_mask[b, j] and (not causal or j <= i) and |i - j| <= w * d and (i - j) % d == 0,

plus, when `extra_k` / `extra_v` are given, G extra keys that query i attends where `extra_mask[b, h, i, g]`
is True (e.g. Longformer's global tokens), normalised in the SAME softmax as the band. The output is
softmax(q k^T * scale over the allowed keys) v.

How (the "blocked" backend, any device): dilation regroups the sequence into d interleaved sub-sequences
(positions r, r + d, r + 2d, ...), on which the pattern is an ordinary band of width w. Each sub-sequence
is cut into blocks of c queries; a block attends the span of keys from c * ceil(w / c) positions before it
to as many after it (none when causal), which holds its band. One fused SDPA call runs all blocks as a
batch with a (c, span) boolean mask per block, so nothing is quadratic in L: the work is L * span, the
largest tensors are the (L / c, H, span, Dh) key/value neighbourhoods and the (L / c, c, span) mask.
The "flex" backend runs the same pattern through FlexAttention with a block-sparse mask (CUDA).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from longlm.attention.backends import flex_attention_kernel

from longlm.options import Option, int_or_int_list, positive_int

# the window of the windowed mixers (`sliding`, `routing`'s local heads): one int, or one per layer
ATTENTION_WINDOW = Option(
    512, lambda v: int_or_int_list(v, positive_int), "a positive integer or a list of one per layer"
)

_CAUSAL_BLOCK = 64  # query block of the causal band: the span is c + w keys for w + 1 needed


def is_int(value) -> bool:
    """An int that is not a bool (config values come from YAML/JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def layer_window(config, layer_idx: int) -> int:
    """The total window of one layer (`attention_window` is one int or one per layer)."""
    window = config.attention_window
    return window if is_int(window) else int(window[layer_idx])


def check_window(config, mixer: str) -> None:
    """One sentence per bad `attention_window`, for every mixer that runs the band."""
    window, layers = config.attention_window, config.num_hidden_layers
    if isinstance(window, (list, tuple)):
        if len(window) != layers:
            raise ValueError(
                f"LongLMConfig.attention_window lists {len(window)} windows but num_hidden_layers is {layers}; "
                f"give one positive integer or one per layer (mixer '{mixer}')."
            )
        if not all(is_int(x) and x > 0 for x in window):
            raise ValueError(f"LongLMConfig.attention_window must hold positive integers, got {list(window)!r}.")
    elif not (is_int(window) and window > 0):
        raise ValueError(
            f"LongLMConfig.attention_window must be a positive integer or a list of one per layer, got {window!r}."
        )


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    one_sided: int,
    causal: bool,
    scale: float,
    key_mask: torch.Tensor | None = None,
    dilation: int | Sequence[int] = 1,
    dropout: float = 0.0,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    backend: str = "blocked",
    block_size: int | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window attention (see the module docstring for the exact pattern) -> (B, H, L, Dh).

    `key_mask` (B, L) bool, False = never attend (except a query's own key). `dilation` is one int or one
    int per head. `extra_k`, `extra_v` (B, H, G, Dh) are keys every query may attend besides its band, with
    `extra_mask` broadcastable to (B, H, L, G) (True = attend; None = all); they share the softmax with the
    band. `dropout` is applied to the attention probabilities. `backend`: "blocked" (batched SDPA over
    blocks, any device) or "flex" (FlexAttention with a block-sparse mask; no dropout; compiled on CUDA, eager
    and slow elsewhere, which only tests use); mixers choose through `longlm.attention.backends`. `block_size` overrides the blocked backend's query block (default: w, or min(w, 64) causal).
    `documents` (B, L) long (`MixerInputs.documents`): a query sees only band keys of its own document (the
    caller folds the rule into `extra_mask` for extra keys).
    """
    heads = q.shape[1]
    if not isinstance(one_sided, int) or one_sided < 0:
        raise ValueError(f"windowed_attention: one_sided must be a non-negative integer, got {one_sided!r}.")
    if (extra_k is None) != (extra_v is None):
        raise ValueError("windowed_attention: pass extra_k and extra_v together, or neither.")
    if backend not in ("blocked", "flex"):
        raise ValueError(f"windowed_attention: backend must be 'blocked' or 'flex', got {backend!r}.")
    per_head = [dilation] * heads if isinstance(dilation, int) else [int(x) for x in dilation]
    if len(per_head) != heads or min(per_head) <= 0:
        raise ValueError(
            f"windowed_attention: dilation must be a positive integer or one per head ({heads}), got {dilation!r}."
        )
    if backend == "flex":
        if dropout > 0.0:
            raise ValueError("windowed_attention: the flex backend has no attention dropout; use backend='blocked'.")
        return flex_windowed(
            q, k, v, one_sided=one_sided, dilation=per_head, causal=causal, scale=scale, key_mask=key_mask,
            extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, documents=documents,
        )
    common = dict(
        one_sided=one_sided, causal=causal, scale=scale, key_mask=key_mask, dropout=dropout, block_size=block_size,
        documents=documents,
    )
    if len(set(per_head)) == 1:
        return _banded(q, k, v, dilation=per_head[0], extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, **common)
    # heads with different dilations: one banded call per group of equal dilation
    out = torch.empty_like(q)
    for value in sorted(set(per_head)):
        group = torch.tensor([h for h, x in enumerate(per_head) if x == value], device=q.device)
        pick = lambda t: t if t is None or t.dim() < 4 or t.shape[1] == 1 else t.index_select(1, group)  # noqa: E731
        out[:, group] = _banded(
            q.index_select(1, group), k.index_select(1, group), v.index_select(1, group), dilation=value,
            extra_k=pick(extra_k), extra_v=pick(extra_v), extra_mask=pick(extra_mask), **common,
        )
    return out


def _rows(x: torch.Tensor, dilation: int, n: int, left: int, right: int) -> torch.Tensor:
    """(B, L, ...) -> (B * d, left + n + right, ...): dilation sub-sequence r (positions r, r + d, ...) in row
    b * d + r, zero-padded to n positions, with `left` / `right` zero halo positions."""
    batch, length = x.shape[:2]
    rest = x.shape[2:]
    x = x.reshape(batch, length, -1)
    if dilation == 1:
        x = F.pad(x, (0, 0, left, n + right - length))
    else:
        x = F.pad(x, (0, 0, 0, n * dilation - length)).view(batch, n, dilation, -1).transpose(1, 2)
        x = F.pad(x, (0, 0, left, right)).reshape(batch * dilation, left + n + right, -1)
    return x.contiguous().view(x.shape[0], x.shape[1], *rest)


def _banded(
    q, k, v, *, one_sided: int, dilation: int, causal: bool, scale: float, key_mask, dropout: float,
    extra_k, extra_v, extra_mask, block_size: int | None, documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The band through SDPA on blocks of queries, each with its neighbourhood of keys (module docstring)."""
    batch, heads, length, head_dim = q.shape
    d = dilation
    n = math.ceil(length / d)
    if block_size is None:  # causal: small blocks waste less of the (c + w)-key span; else c = w measured best
        block_size = min(one_sided, _CAUSAL_BLOCK) if causal else one_sided
    c = max(1, min(block_size, n))
    blocks = math.ceil(n / c)
    seq = blocks * c
    reach = min(math.ceil(one_sided / c), blocks - 1) if one_sided > 0 else 0
    left, right = reach * c, (0 if causal else reach * c)
    span = left + c + right
    rows = batch * d * blocks
    # (B d blocks, H, c, Dh) queries; (B d blocks, H, span, Dh) keys and values of each block's neighbourhood
    qb = _rows(q.transpose(1, 2), d, seq, 0, 0).reshape(rows, c, heads, head_dim).transpose(1, 2)

    def neighbourhood(x):
        x = _rows(x.transpose(1, 2), d, seq, left, right)  # (B d, left + seq + right, H, Dh)
        return x.unfold(1, span, c).permute(0, 1, 2, 4, 3).reshape(rows, heads, span, head_dim)
    kb, vb = neighbourhood(k), neighbourhood(v)
    # one row for all when nothing differs per row; per row when documents do (rows are (row, dilation) pairs)
    rows_of_valid = 1 if documents is None else batch
    valid = torch.ones(rows_of_valid, length, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    valid = _rows(valid.to(torch.uint8), d, seq, left, right).unfold(1, span, c).bool()  # (B|1 d, blocks, span)
    offset = torch.arange(span, device=q.device)[None, :] - left - torch.arange(c, device=q.device)[:, None]
    band = ((offset <= 0) if causal else (offset <= one_sided)) & (offset >= -one_sided)
    allowed = (valid[:, :, None, :] | (offset == 0)) & band  # (B|1 d, blocks, c, span)
    if documents is not None:  # block-diagonal by document: each query's number against its keys'
        query_docs = _rows(documents, d, seq, 0, 0).view(-1, blocks, c)
        key_docs = _rows(documents, d, seq, left, right).unfold(1, span, c)  # (B d, blocks, span)
        allowed = allowed & (query_docs[..., :, None] == key_docs[..., None, :])
    allowed = allowed.view(-1, d, blocks, c, span).expand(batch, d, blocks, c, span).reshape(rows, 1, c, span)
    if extra_k is not None:
        g = extra_k.shape[2]
        expand = lambda t: t[:, None].expand(batch, d * blocks, heads, g, head_dim).reshape(rows, heads, g, head_dim)  # noqa: E731
        kb, vb = torch.cat([kb, expand(extra_k)], dim=2), torch.cat([vb, expand(extra_v)], dim=2)
        m = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device) if extra_mask is None else extra_mask.bool()
        m = m.view(*([1] * (4 - m.dim())), *m.shape)
        mh = m.shape[1]
        m = m.expand(batch, mh, length, g).transpose(1, 2)  # (B, L, Hm, G)
        m = _rows(m.to(torch.uint8), d, seq, 0, 0).view(rows, c, mh, g).transpose(1, 2).bool()
        allowed = torch.cat([allowed.expand(rows, mh, c, span), m], dim=-1)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout, scale=scale)
    out = out.transpose(1, 2).reshape(batch, d, seq, heads, head_dim)[:, :, :n]  # (B, d, n, H, Dh)
    return out.permute(0, 2, 1, 3, 4).reshape(batch, n * d, heads, head_dim)[:, :length].transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# FlexAttention path (CUDA): the same pattern as a mask_mod, with a block-sparse BlockMask built from the
# band's block structure directly (O((L / 128)^2) booleans, never an L x L mask).
# --------------------------------------------------------------------------------------------------
_FLEX_BLOCK = 128
_EXTRA_MULTIPLE = 64  # extra keys are padded (masked) to a multiple of this, so few shapes get compiled


def flex_available() -> bool:
    """Whether this torch build has FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(
    batch: int, heads: int, length: int, *, one_sided: int, dilation: list[int], causal: bool, key_mask, extra: int,
    extra_mask, device, documents=None,
):
    """The BlockMask of the pattern over L queries and L + extra keys (extra keys appended after the sequence)."""
    from torch.nn.attention.flex_attention import BlockMask

    total = length + extra
    valid = torch.ones(batch, total, dtype=torch.bool, device=device)
    if key_mask is not None:
        valid[:, :length] = key_mask.bool()
    dil = torch.tensor(dilation, device=device)
    if extra:
        em = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device) if extra_mask is None else extra_mask.bool()
        em = em.view(*([1] * (4 - em.dim())), *em.shape).expand(batch, heads, length, extra)

    def mask_mod(b, h, qi, ki):
        diff = qi - ki
        step = dil[h]
        band = (diff.abs() <= one_sided * step) & (diff % step == 0) & valid[b, ki]
        if causal:
            band = band & (diff >= 0)
        allowed = (ki < length) & (band | (diff == 0))
        if documents is not None:
            allowed = allowed & (documents[b, qi] == documents[b, ki.clamp(max=length - 1)])
        if extra:
            allowed = allowed | ((ki >= length) & em[b, h, qi, (ki - length).clamp(min=0)])
        return allowed

    # which (query block, key block) pairs can hold an allowed pair, per head: (1, H, nq, nk)
    block = _FLEX_BLOCK
    nq, nk = -(-length // block), -(-total // block)
    q_lo = torch.arange(nq, device=device)[:, None] * block
    q_hi = (q_lo + block - 1).clamp(max=length - 1)
    k_lo = torch.arange(nk, device=device)[None, :] * block
    reach = (dil * one_sided)[:, None, None]
    near = (k_lo <= q_hi + (0 if causal else 1) * reach) & (k_lo + block - 1 >= q_lo - reach) & (k_lo < length)
    if extra:
        near = near | (k_lo + block - 1 >= length)
    near = near[None]
    counts = near.sum(dim=-1).to(torch.int32)
    indices = torch.argsort((~near).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(length, total))


def flex_windowed(
    q, k, v, *, one_sided: int, dilation: list[int], causal: bool, scale: float, key_mask, extra_k, extra_v, extra_mask,
    documents=None,
) -> torch.Tensor:
    """`windowed_attention` through FlexAttention; extra keys are appended after the L sequence keys."""
    batch, heads, length, _ = q.shape
    extra = 0 if extra_k is None else extra_k.shape[2]
    if extra:
        padded = -(-extra // _EXTRA_MULTIPLE) * _EXTRA_MULTIPLE
        m = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device) if extra_mask is None else extra_mask.bool()
        m = m.view(*([1] * (4 - m.dim())), *m.shape)
        extra_mask = F.pad(m.expand(*m.shape[:2], length, extra), (0, padded - extra), value=False)
        pad = lambda t: F.pad(t, (0, 0, 0, padded - extra))  # noqa: E731
        k, v = torch.cat([k, pad(extra_k)], dim=2), torch.cat([v, pad(extra_v)], dim=2)
        extra = padded
    block_mask = flex_block_mask(
        batch, heads, length, one_sided=one_sided, dilation=dilation, causal=causal, key_mask=key_mask, extra=extra,
        extra_mask=extra_mask, device=q.device, documents=documents,
    )
    return flex_attention_kernel(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale)
