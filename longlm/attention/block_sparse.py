"""`block_sparse`: BigBird's ITC block-sparse attention (Zaheer et al. 2020).

Dense definition. b = `block_size`, r = `num_random_blocks`. A segment of L tokens is padded at its end to
n = ceil(L / b) blocks; query token t lies in block i = t // b, key token s in block j = s // b.
* Bidirectional: t may attend s iff i in {0, n-1} (global queries) or j in {0, n-1} (global keys) or
  |i - j| <= 1 (the 3-block window) or j in R_h(i).
* Causal (decoders): t may attend s iff s <= t and (j = 0 or i - j <= 1 or j in R_h(i)): the window is the
  previous and the own block (causal inside the own block), block 0 is the only global block (a global key
  for everyone; its own queries see just block 0). There is no global last block: which block is last
  depends on L, and a token's pattern must not change as the sequence grows, so that token-by-token
  generation (a forward over each prefix) reproduces the logits of one forward over the whole sequence.
* R_h(i), per head h, holds r key blocks drawn uniformly without replacement from the blocks not already
  attended. Bidirectional, rows 0 < i < n-1: {1..n-2} minus {i-1, i, i+1}. Causal, rows 0 < i < n:
  {1..i-2} (all of them when there are fewer than r); this plan depends only on (seed, layer, head, i), never
  on n: its uniforms are drawn as one (rows, H, r) tensor, so row i's draws sit at the same offsets of the
  generator's stream for every n, and the plan for n blocks is the first n rows of the plan for any longer
  segment. The plan is drawn from a generator seeded with `random_blocks_seed + layer_idx` and is the same in
  training and eval: HF BigBird also fixes it per layer (it reseeds numpy with the layer index on every
  training forward), as did the original code, which builds it once per graph. (HF's eval mode drops the
  plan: all its random slots point at block 0.)
* Short segments fall back to exact full attention (causal for decoders), as HF does. Bidirectional: HF
  BigBird's rule, L <= (5 + 2r) * b (on the unpadded length), where the fallback differs from the pattern.
  Causal: only L <= (3 + r) * b, where the fallback IS the pattern (every query block i <= r + 2 already
  sees blocks 0, 1..i-2 (all random), i-1 and i), so the fast path never changes a token's attention.
* Keys that are padding (`key_mask` False, or the internal padding of the last block) are never attended,
  except that a query always sees itself. `global_mask` is ignored: ITC's global tokens are fixed blocks.
* Documents (`MixerInputs.documents`): in addition to all of the above, t may attend s only when
  documents[t] == documents[s] (block-diagonal by document; a query's own key is always in its document).
  Blocks, the random plan and the fallback threshold depend on positions only, never on token content, so
  a token at or after a document start depends on nothing before that start.

CPU path: the global query blocks (0 and, bidirectional, n-1) attend through SDPA; every other query block
(1..n-2 bidirectional, 1..n-1 causal) attends its (5 + r) key blocks (3 + r causal), gathered with one
`index_select` per K and V, through one batched SDPA call whose heads are the query blocks. Memory and time
are O(L * (5 + r) * b). CUDA path: FlexAttention with a block mask built from the same block table (the tests
check that both give the same outputs).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from longlm.attention.base import ContentProjections, MixerInputs, TokenMixer
from longlm.attention.backends import attend, flex_attention_kernel, uses_flex
from longlm.attention.kv_cache import cached_step_attention
from longlm.attention.masks import segment_attention_mask
from longlm.attention.registry import MIXERS
from longlm.options import NON_NEGATIVE, POSITIVE, option
from longlm.layers.positions import apply_rotary, rotary_for

FLEX_TILE = 128  # FlexAttention's default sparse block size


def full_attention_threshold(block_size: int, num_random_blocks: int, causal: bool = False) -> int:
    """Segments of at most this many tokens use exact full attention: HF BigBird's rule, (5 + 2r) b, when
    bidirectional; (3 + r) b when causal, the longest prefix that the causal pattern itself fully covers."""
    return ((3 + num_random_blocks) if causal else (5 + 2 * num_random_blocks)) * block_size


def random_block_plan(
    num_blocks: int, num_random_blocks: int, num_heads: int, *, causal: bool, seed: int
) -> torch.Tensor:
    """R_h(i) as a (H, n, r) long tensor of key-block indices in ascending order, -1 in unused slots (global
    rows, and causal rows with fewer than r candidates). Each row's candidates are numbered 0..c-1 and a
    uniform r-subset of them is drawn with Floyd's algorithm (r vectorised steps: O(H n r), no n x n table).
    Causal plans are prefix-stable: the plan for n blocks is the first n rows of the plan for n + k blocks."""
    n, r = num_blocks, num_random_blocks
    plan = torch.full((num_heads, n, r), -1, dtype=torch.long)
    if r == 0 or n < 3:
        return plan
    generator = torch.Generator().manual_seed(seed)
    if causal:  # rows 1..n-1, candidates 1..i-2
        rows = torch.arange(1, n)
        count, low, skip = (rows - 2).clamp(min=0), rows, torch.zeros_like(rows)
        # one (rows, H, r) draw: row i's uniforms are at the same stream offsets whatever n is
        uniform = torch.rand(len(rows), num_heads, r, generator=generator, dtype=torch.float64).permute(1, 2, 0)
    else:  # rows 1..n-2, candidates 1..n-2 minus the window [i-1, i+1] clipped to [1, n-2]
        rows = torch.arange(1, n - 1)
        low, high = (rows - 1).clamp(min=1), (rows + 1).clamp(max=n - 2)
        skip = high - low + 1
        count = (n - 2) - skip
        uniform = torch.stack(
            [torch.rand(r, len(rows), generator=generator, dtype=torch.float64) for _ in range(num_heads)]
        )
    ranks = torch.arange(r).expand(len(rows), r).clone()  # rows with count <= r take every candidate
    for head in range(num_heads):
        chosen = ranks.clone()
        for step in range(r):  # Floyd: for j = c-r .. c-1, draw t in [0, j]; keep t, or j if t is taken
            top = count - r + step
            draw = (uniform[head, step] * (top + 1)).floor().long()
            taken = (chosen[:, :step] == draw[:, None]).any(-1)
            chosen[:, step] = torch.where(count > r, torch.where(taken, top, draw), chosen[:, step])
        chosen = chosen.sort(dim=-1).values
        blocks = chosen + 1 + skip[:, None] * (chosen + 1 >= low[:, None])  # rank -> block id, past the window
        plan[head, rows] = blocks.masked_fill(chosen >= count[:, None], -1)
    return plan


def block_table(num_blocks: int, plan: torch.Tensor, causal: bool) -> torch.Tensor:
    """(H, n, n) bool: may query block i attend key block j (token-level causality and padding apart)."""
    n = num_blocks
    i = torch.arange(n, device=plan.device)[:, None]
    j = torch.arange(n, device=plan.device)[None, :]
    if causal:
        base = (j <= i) & ((j == 0) | (i - j <= 1))
    else:
        base = (i == 0) | (i == n - 1) | (j == 0) | (j == n - 1) | ((i - j).abs() <= 1)
    table = base.expand(plan.shape[0], n, n).clone()
    if plan.shape[-1]:
        chosen = torch.zeros(plan.shape[0], n, n + 1, dtype=torch.bool, device=plan.device)
        chosen.scatter_(2, plan.masked_fill(plan < 0, n), True)
        table |= chosen[..., :n]
    return table


def _pad_documents(documents: torch.Tensor, padded_length: int) -> torch.Tensor:
    """(B, L) -> (B, padded_length): the internal padding joins the row's last document, so its (discarded)
    queries keep their own key and a full tile never straddles a document for want of a number."""
    extra = padded_length - documents.shape[1]
    return torch.cat([documents, documents[:, -1:].expand(-1, extra)], dim=1) if extra else documents


def _pad_to_blocks(x: torch.Tensor, padded_length: int) -> torch.Tensor:
    """(B, H, L, Dh) -> contiguous (B, H, padded_length, Dh), zeros at the end."""
    extra = padded_length - x.shape[2]
    return F.pad(x, (0, 0, 0, extra)) if extra else x.contiguous()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    plan: torch.Tensor,
    causal: bool,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sparse pattern of the module docstring (no short-segment fallback) on the CPU path.

    q, k, v (B, H, L, Dh); `plan` (H, n, r) from `random_block_plan`; `key_mask` (B, L) bool, False = padding;
    `documents` (B, L) long, `MixerInputs.documents` (None: one document).
    """
    batch, length = q.shape[0], q.shape[2]
    b = block_size
    n = -(-length // b)
    padded = n * b
    q, k, v = (_pad_to_blocks(t, padded) for t in (q, k, v))
    valid = None
    # Causal queries never see the internal padding (it comes after every real token), so only a user mask or
    # bidirectional attention over a padded last block needs key validity.
    if key_mask is not None or (padded != length and not causal):
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
        valid = F.pad(valid, (0, padded - length), value=False)
    user_mask = key_mask is not None
    docs = None if documents is None else _pad_documents(documents.to(q.device), padded)
    parts = [_global_rows(q, k, v, 0, b, causal, valid, user_mask, scale, dropout, docs)]
    if n >= (2 if causal else 3):
        parts.append(_middle_rows(q, k, v, b, plan, causal, valid, user_mask, scale, dropout, docs))
    if n >= 2 and not causal:
        parts.append(_global_rows(q, k, v, n - 1, b, causal, valid, user_mask, scale, dropout, docs))
    return torch.cat(parts, dim=2)[:, :, :length]


_MASK_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MASK_CACHE_SIZE = 8  # masks that depend on the shape only (no user key_mask), shared by all layers and steps


def _cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key in _MASK_CACHE:
        _MASK_CACHE.move_to_end(key)
        return _MASK_CACHE[key]
    value = _MASK_CACHE[key] = build()
    if len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return value


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive form (0 / -inf) of a boolean mask: SDPA would otherwise convert it again in backward."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _global_rows(
    q, k, v, block: int, b: int, causal: bool, valid, user_mask: bool, scale, dropout, docs=None
) -> torch.Tensor:
    """Global query block `block` (0, or n-1 when bidirectional) against every key (causal: block 0 against
    itself, causally); `docs` (B, padded) restricts each query to its own document."""
    padded = k.shape[2]
    rows = slice(block * b, (block + 1) * b)
    end = (block + 1) * b if causal else padded
    query, key, value = q[:, :, rows], k[:, :, :end], v[:, :, :end]
    if user_mask or docs is not None:  # key validity, the causal limit, the self rule, documents: per batch row
        positions = torch.arange(end, device=q.device)
        query_pos = positions[block * b : (block + 1) * b, None]
        keep = positions[None, :] <= query_pos if causal else torch.ones(1, end, dtype=torch.bool, device=q.device)
        if valid is not None:
            keep = (valid[:, None, None, :end] | (positions[None, :] == query_pos)) & keep
        if docs is not None:
            keep = keep & (docs[:, None, rows, None] == docs[:, None, None, :end])
        mask = _bias(keep, q.dtype)
    elif causal:  # block 0: causal padding never precedes a real query
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scale)
    elif valid is not None:  # bidirectional, padded last block: the same keys for every query
        mask = _bias(valid[:, None, None, :], q.dtype)
    else:
        mask = None
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)


def _middle_stop(n: int, causal: bool) -> int:
    """The middle (non-global) query blocks are 1 .. stop - 1: up to n-2 bidirectional, n-1 causal."""
    return n if causal else n - 1


def _slots(n: int, plan: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks of the middle query blocks: `index` (H or 1, m, W) and `on` (H or 1, m, W), False for slots
    that repeat a window block (row 1's block 0, bidirectional row n-2's block n-1) or hold no random block.
    Slot order: previous, own, [next,] block 0, [block n-1,] random blocks; slot 1 is the own block."""
    stop = _middle_stop(n, causal)
    rows = torch.arange(1, stop)
    m = stop - 1
    zeros, last = torch.zeros_like(rows), torch.full_like(rows, n - 1)
    base = torch.stack([rows - 1, rows, zeros] if causal else [rows - 1, rows, rows + 1, zeros, last], dim=-1)
    on = torch.ones_like(base, dtype=torch.bool)
    on[0, 2 if causal else 3] = False
    if not causal:
        on[m - 1, 4] = False
    random = plan[:, 1:stop].cpu()  # (H, m, r)
    if not random.shape[-1]:
        return base[None], on[None]
    index = torch.cat([base.expand(random.shape[0], m, -1), random.clamp(min=0)], dim=-1)
    on = torch.cat([on.expand(random.shape[0], m, -1), random >= 0], dim=-1)
    if (on == on[:1]).all():
        on = on[:1]  # our plans put empty slots last, so every head (and layer) shares one mask
    return index, on


def _middle_rows(
    q, k, v, b: int, plan, causal: bool, valid, user_mask: bool, scale, dropout, docs=None
) -> torch.Tensor:
    """The middle query blocks (1..n-2, causal 1..n-1), each against its window, global and random key blocks
    in one SDPA call whose batch is (B * H) and whose heads are the m middle query blocks. `docs` (B, padded):
    the key blocks' document numbers are gathered like the keys and compared with each query's."""
    batch, heads, padded, head_dim = q.shape
    n = padded // b
    index, on = _slots(n, plan, causal)
    m, width = index.shape[-2:]
    flat = (torch.arange(heads)[:, None, None] * n + index).reshape(-1).to(q.device)  # (H * m * W)
    keys, values = (
        t.view(batch, heads * n, b * head_dim).index_select(1, flat).view(batch * heads, m, width * b, head_dim)
        for t in (k, v)
    )
    if user_mask or docs is not None:  # per batch row: not cached
        index_here, on_here = index.to(q.device), on.to(q.device)
        mask = _middle_mask(index_here, on_here, b, causal, valid, user_mask, batch, heads, q.dtype, docs)
    else:  # without a user mask, `valid` only marks the padded tail: the unpadded length names it
        length = None if valid is None else int(valid[0].sum())
        key = ("middle", n, b, causal, length, batch, heads, q.dtype, q.device, on.shape, on.numpy().tobytes())
        index_here, on_here = index.to(q.device), on.to(q.device)
        mask = _cached(key, lambda: _middle_mask(index_here, on_here, b, causal, valid, False, batch, heads, q.dtype))
    queries = q[:, :, b : (m + 1) * b].reshape(batch * heads, m, b, head_dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.view(batch, heads, m * b, head_dim)


def _middle_mask(
    index, on, b: int, causal: bool, valid, user_mask: bool, batch: int, heads: int, dtype: torch.dtype, docs=None
) -> torch.Tensor:
    """Additive mask broadcastable to (B * H, m, b, W * b) for `_middle_rows`: one row of keys per query
    block when no query-dependent rule applies, else one row per query (causal own block, self rule,
    documents). Without a user mask `valid` only marks the padded last block, the same for every batch row."""
    keys = on[None, :, :, :, None]  # (1, Ho, m, W, 1)
    if valid is not None:
        valid = valid if user_mask else valid[:1]
        keys = keys & valid.view(valid.shape[0], -1, b)[:, index]  # (Bm, H?, m, W, b)
        if keys.shape[1] > 1 and bool((keys == keys[:, :1]).all()):
            keys = keys[:, :1]  # heads differ only in random blocks, and those are all valid
    keys = keys.expand(-1, -1, -1, -1, b)
    if causal or user_mask or docs is not None:
        own = keys[:, :, :, 1, None, :]  # (Bm, Hm, m, 1, b)
        if causal:
            own = own & torch.ones(b, b, dtype=torch.bool, device=keys.device).tril()
        if user_mask:
            own = own | torch.eye(b, dtype=torch.bool, device=keys.device)
        keys = keys[:, :, :, None].expand(-1, -1, -1, b, -1, -1).clone()  # (Bm, Hm, m, b, W, b)
        keys[:, :, :, :, 1] = own
        if docs is not None:
            keys = keys & _same_document_slots(docs, index, b)
    else:
        keys = keys[:, :, :, None]  # (Bm, Hm, m, 1, W, b): the same keys for every query of a block
    mask = _bias(keys.flatten(-2), dtype)  # (Bm, Hm, m, q, W * b)
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        return mask[0]  # (1, m, q, W * b) broadcasts over B * H
    return mask.expand(batch, heads, *mask.shape[2:]).reshape(batch * heads, *mask.shape[2:])


def _same_document_slots(docs: torch.Tensor, index: torch.Tensor, b: int) -> torch.Tensor:
    """(B, H or 1, m, b, W, b) bool for `_middle_mask`: does the key at (slot, offset) of middle query block
    1 + i lie in the document of query (i, offset)? The key blocks' numbers are gathered with `index`."""
    blocks = docs.view(docs.shape[0], -1, b)  # (B, n, b)
    key_docs = blocks[:, index]  # (B, Hi, m, W, b)
    query_docs = blocks[:, 1 : index.shape[-2] + 1]  # (B, m, b)
    return query_docs[:, None, :, :, None, None] == key_docs[:, :, :, None, :, :]


# ----------------------------------------------------------------------------------------------------
# CUDA: FlexAttention with a block mask built from the same block table
# ----------------------------------------------------------------------------------------------------
def _flex_attention(q, k, v, block_mask, scale):
    """flex_attention, compiled on CUDA (eager elsewhere: the eager CPU kernel runs forward only)."""
    return flex_attention_kernel(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T, T) bool tile mask -> (count, indices) with the allowed tiles first, as BlockMask wants."""
    count = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(~dense, dim=-1, stable=True).to(torch.int32)
    return count, indices.contiguous()


def flex_block_mask(
    table: torch.Tensor, b: int, padded: int, causal: bool, valid: torch.Tensor | None, batch: int,
    docs: torch.Tensor | None = None,
):
    """A FlexAttention BlockMask equal to the dense definition: tiles of FLEX_TILE tokens, partial tiles
    resolved token by token by the mask_mod (block table, causality, key padding, the self rule, documents:
    `docs` (B, padded) long, see `_document_tiles`)."""
    from torch.nn.attention.flex_attention import BlockMask

    heads, n, _ = table.shape
    device = table.device
    tiles = -(-padded // FLEX_TILE)
    token_block = torch.arange(tiles * FLEX_TILE, device=device).clamp(max=padded - 1) // b
    touches = torch.zeros(tiles, n, device=device)  # tile x block incidence
    touches[torch.arange(tiles * FLEX_TILE, device=device) // FLEX_TILE, token_block] = 1.0
    pairs = touches.sum(-1)
    hits = touches @ table.to(touches.dtype) @ touches.T  # (H, T, T) allowed (query block, key block) pairs
    any_ = hits > 0
    full = hits == pairs[:, None] * pairs[None, :]
    tile = torch.arange(tiles, device=device)
    full &= ((tile + 1) * FLEX_TILE <= padded)[None, :]  # a key tile reaching past the end is never full
    if causal:
        any_ &= tile[None, :] <= tile[:, None]
        full &= tile[None, :] < tile[:, None]
    full = full[None].expand(batch, -1, -1, -1)
    if valid is not None:
        key_tiles = F.pad(valid, (0, tiles * FLEX_TILE - padded), value=False).view(batch, tiles, FLEX_TILE).all(-1)
        full = full & key_tiles[:, None, None, :]
    if docs is not None:
        overlap, full_pair = _document_tiles(docs, tiles)
        full = full & full_pair
    partial = any_[None] & ~full
    if docs is not None:
        partial = partial & overlap
    table_flat = table.reshape(-1)

    def mask_mod(b_idx, h, q_idx, kv_idx):
        # indices of a last tile that reaches past the end are clamped for the lookups (flex drops them anyway)
        q_at, kv_at = q_idx.clamp(max=padded - 1), kv_idx.clamp(max=padded - 1)
        allowed = table_flat[(h * n + q_at // b) * n + kv_at // b]
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        if valid is not None:
            allowed = allowed & (valid[b_idx, kv_at] | (kv_idx == q_idx))
        if docs is not None:
            allowed = allowed & (docs[b_idx, q_at] == docs[b_idx, kv_at])
        return allowed

    count, indices = _ordered(partial.expand(batch, heads, -1, -1))
    full_count, full_indices = _ordered(full.expand(batch, heads, -1, -1))
    return BlockMask.from_kv_blocks(
        count, indices, full_count, full_indices, BLOCK_SIZE=FLEX_TILE, mask_mod=mask_mod, seq_lengths=(padded, padded)
    )


def _document_tiles(docs: torch.Tensor, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(overlap, full), both (B, 1, T, T) bool, for tile pairs under the document rule. Numbers never
    decrease along a row, so a tile holds the range [first, last]: a pair can hold an allowed token pair only
    when the ranges meet, and every pair is in one document only when both tiles hold the same single one."""
    numbers = _pad_documents(docs, tiles * FLEX_TILE).view(docs.shape[0], tiles, FLEX_TILE)
    low, high = numbers[..., 0], numbers[..., -1]  # (B, T)
    overlap = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
    single = low == high
    full = single[:, :, None] & single[:, None, :] & (low[:, :, None] == low[:, None, :])
    return overlap[:, None], full[:, None]


def sparse_block_mask(
    batch: int, heads: int, length: int, *, block_size: int, plan: torch.Tensor, causal: bool, key_mask=None,
    documents=None, device: torch.device | str = "cpu",
):
    """The BlockMask of `flex_block_sparse_attention` over the segment padded to whole blocks (its own
    function so that tests can check the tile bookkeeping, which eager CPU flex does not use)."""
    n = -(-length // block_size)
    padded = n * block_size
    valid = None
    if key_mask is not None or padded != length:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
        valid = F.pad(valid, (0, padded - length), value=False)
    table = block_table(n, plan.to(device), causal)
    if table.shape[0] != heads:
        table = table.expand(heads, -1, -1).contiguous()
    docs = None if documents is None else _pad_documents(documents.to(device), padded)
    return flex_block_mask(table, block_size, padded, causal, valid, batch, docs)


def flex_block_sparse_attention(
    q, k, v, *, block_size: int, plan: torch.Tensor, causal: bool, key_mask=None, scale=None, documents=None
) -> torch.Tensor:
    """The same pattern as `block_sparse_attention`, through FlexAttention (no attention dropout)."""
    batch, heads, length, _ = q.shape
    padded = -(-length // block_size) * block_size
    q, k, v = (_pad_to_blocks(t, padded) for t in (q, k, v))
    block_mask = sparse_block_mask(
        batch, heads, length, block_size=block_size, plan=plan, causal=causal, key_mask=key_mask,
        documents=documents, device=q.device,
    )
    return _flex_attention(q, k, v, block_mask, scale)[:, :, :length]


# ----------------------------------------------------------------------------------------------------
# the mixer
# ----------------------------------------------------------------------------------------------------
@MIXERS.register("block_sparse")
class BlockSparseAttention(TokenMixer):
    """BigBird ITC attention (see the module docstring); rotary when `position_embedding_type="rotary"`.

    Same projections as `full` (q_proj, kv_proj, o_proj; biased when `attention_bias`), so weights move between
    the two.
    """

    supports_attention_bias = True
    supports_kv_cache = True  # causal: a full cache, each new query masked to its blocks (`_in_pattern`)
    options = {
        "block_size": option(64, POSITIVE),
        "num_random_blocks": option(3, NON_NEGATIVE),  # per query block
        "random_blocks_seed": option(0, NON_NEGATIVE),  # of the (fixed) random plan
    }

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_proj = nn.Linear(config.hidden_size, self.inner_size, bias=config.attention_bias)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.inner_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.inner_size, config.hidden_size, bias=config.attention_bias)
        self.rotary = config.position_embedding_type == "rotary"
        self.block_size = config.block_size
        self.num_random_blocks = config.num_random_blocks
        self.seed = config.random_blocks_seed + layer_idx
        # None: segments up to `full_attention_threshold(..., causal)` tokens use exact full attention; an int
        # overrides that length (tests set 0 to force the sparse path)
        self.dense_up_to: int | None = None
        self._plans: dict[tuple[int | None, bool, torch.device], torch.Tensor] = {}

    @classmethod
    def check_config(cls, config) -> None:
        for name, low, what in (
            ("block_size", 1, "a positive integer"),
            ("num_random_blocks", 0, "a non-negative integer"),
            ("random_blocks_seed", 0, "a non-negative integer"),
        ):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"LongLMConfig.{name} must be {what} for the block_sparse mixer, got {value!r}.")
        if config.mem_len:
            raise ValueError(
                f"The block_sparse mixer attends within one segment and carries no memory, so LongLMConfig.mem_len "
                f"must be 0, got {config.mem_len!r}."
            )
        causal = bool(config.is_decoder)
        threshold = full_attention_threshold(config.block_size, config.num_random_blocks, causal)
        rule = "(3 + num_random_blocks) * block_size" if causal else "(5 + 2 * num_random_blocks) * block_size"
        if threshold >= config.max_position_embeddings:
            raise ValueError(
                f"LongLMConfig.block_size={config.block_size} with num_random_blocks={config.num_random_blocks} "
                f"cannot be honoured: {'causal' if causal else 'bidirectional'} block-sparse attention starts above "
                f"{rule} = {threshold} tokens, but max_position_embeddings is {config.max_position_embeddings}, so "
                f"every segment would fall back to full attention."
            )

    def random_plan(self, num_blocks: int, causal: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """This layer's R_h(i) for n blocks, (H, n, r), drawn once (on the CPU, so every device gets the same
        plan) and cached per device; not a parameter, since the seed (and, bidirectional, n) determine it.
        Causal plans are prefix-stable, so one plan, grown by doubling, serves every length."""
        device = torch.device(device)

        def draw(rows: int) -> torch.Tensor:
            plan = random_block_plan(rows, self.num_random_blocks, self.num_heads, causal=causal, seed=self.seed)
            return plan.to(device)

        if not causal:
            key = (num_blocks, False, device)
            if key not in self._plans:
                self._plans[key] = draw(num_blocks)
            return self._plans[key]
        key = (None, True, device)
        plan = self._plans.get(key)
        if plan is None or plan.shape[1] < num_blocks:
            plan = self._plans[key] = draw(num_blocks if plan is None else max(num_blocks, 2 * plan.shape[1]))
        return plan[:, :num_blocks].contiguous()

    provides_projections = True

    def content_projections(self) -> ContentProjections:
        return ContentProjections.of(self.q_proj, self.kv_proj, self.num_heads, self.head_dim)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        if inputs.memory is not None:
            raise ValueError("The block_sparse mixer takes no memory; use memory='none' (or one without states).")
        if inputs.cache is not None and inputs.cache.past is not None:
            return self._cached_step(hidden, inputs)
        length = hidden.shape[1]
        q = self.split_heads(self.q_proj(hidden))
        k, v = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        if self.rotary:
            cos, sin = rotary_for(inputs.rotary, length, self.head_dim, self.rope_theta, hidden.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.attention_dropout_p
        key_mask, documents = inputs.key_mask, inputs.documents
        dense_up_to = self.dense_up_to
        if dense_up_to is None:
            dense_up_to = full_attention_threshold(self.block_size, self.num_random_blocks, inputs.causal)
        if length <= dense_up_to:
            mask = (
                segment_attention_mask(
                    length, 0, causal=inputs.causal, key_mask=key_mask, documents=documents, device=hidden.device
                )
                if key_mask is not None or documents is not None
                else None
            )
            out = attend(
                q, k, v, mask=mask, causal=inputs.causal, dropout=dropout, scale=self.scale, implementation=self.attn_implementation,
            )
        else:
            plan = self.random_plan(-(-length // self.block_size), inputs.causal, hidden.device)
            common = {"block_size": self.block_size, "plan": plan, "causal": inputs.causal, "key_mask": key_mask}
            common.update(scale=self.scale, documents=documents)
            if uses_flex(self.attn_implementation, dropout):
                out = flex_block_sparse_attention(q, k, v, **common)
            else:
                out = block_sparse_attention(q, k, v, dropout=dropout, **common)
        if inputs.cache is not None:  # the prompt of a cached generate(): keep its keys for the next steps
            inputs.cache.write(k, v)
        return self.o_proj(self.merge_heads(out))

    def _in_pattern(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """The causal block pattern of the module docstring for every head, (B, H, L, K): key block 0, the own
        and the previous block, and the query block's random blocks R_h(i)."""
        query_block, key_block = query_pos // self.block_size, key_pos // self.block_size  # (B, L, 1), (B, 1, K)
        plan = self.random_plan(int(query_block.max()) + 1, True, query_pos.device)  # (H, n, r)
        rows = plan[:, query_block[..., 0]].permute(1, 0, 2, 3)  # (B, H, L, r)
        chosen = (rows[..., None, :] == key_block[:, None, :, :, None]).any(dim=-1)  # (B, H, L, K)
        return ((key_block == 0) | (query_block - key_block <= 1))[:, None] | chosen

    def _cached_step(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        """New tokens after every cached key, each attending only its block pattern: O(cached keys) per token."""
        q = self.split_heads(self.q_proj(hidden))
        k, v = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        theta = self.rope_theta if self.rotary else None
        out = cached_step_attention(q, k, v, inputs.cache, pattern=self._in_pattern, scale=self.scale, rope_theta=theta,
            implementation=self.attn_implementation,
        )
        return self.o_proj(self.merge_heads(out))
