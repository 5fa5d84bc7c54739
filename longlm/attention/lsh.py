"""`lsh`: Reformer's shared-QK attention over locality-sensitive-hash buckets (Kitaev et al. 2020).

Dense definition (what `tests/test_lsh.py` rebuilds with explicit (B, H, L, L) masks):

* One projection gives per-head vectors x_i (rotary-rotated when `position_embedding_type="rotary"`).
  Queries are x_i; keys are the length-normalised x_j / sqrt(mean(x_j^2) + 1e-6) / sqrt(head_dim), so
  score(i, j) = x_i . k_j (Reformer's shared-QK attention, HF's `LSHSelfAttention` scaling).
* Hashing: round r puts token i in bucket argmax([x_i R_r ; -x_i R_r]) with R_r a fixed random
  (head_dim, num_buckets / 2) matrix per head and round (`num_buckets=1` means one bucket, no hashing).
  The buckets see the rotated vectors, the ones the scores are made of. Padding keys (`key_mask` False)
  and the tokens added to reach a multiple of `lsh_chunk_length` = c go to an extra last bucket and are
  never attended.
* Bidirectional (the paper's and HF's pattern): per round, sort tokens by (bucket, position), pad to a
  multiple of c, concatenate the rounds, cut into chunks of c; a query sees every valid key of its own
  chunk and of the previous chunk (the first chunk of a round looks at the last chunk of the round
  before, the very first chunk at the last chunk of the last round, exactly as HF).
* Causal (strictly causal, unlike HF / reformer-pytorch whose sorted chunks move when later tokens
  change bucket): in round r, the rank of token t is the number of earlier tokens in its bucket; a query
  of rank p sees the earlier tokens of its own bucket whose rank is >= c * floor(p / c) - c, i.e. its
  chunk and the previous chunk *within the bucket*. Ranks depend only on earlier tokens, so the output
  at t cannot change when later tokens do. (Layout: the same sorted order as above, each query chunk
  reading its own and the two previous sorted chunks, which hold every key it may see.)
* Documents (`MixerInputs.documents`, when a document starts inside the segment): the pattern runs on each
  document as if it were alone. Bucket b of a token of document d becomes d * num_buckets + b (padding and
  filler still in a last bucket above all), so the sort is document-major and a rank (causal) or a chunk
  slot (bidirectional) counts only tokens of the token's own document plus the *number* of valid tokens of
  the earlier ones; and a query sees a key only when both carry the same document number (a padding query
  keeps its own number). Outputs at or after a start therefore do not depend on the content of tokens
  before it, bit for bit (masked slots contribute exact zeros), in both modes.
* Self: a token does not attend to itself unless nothing else is visible; its own score is replaced by
  -1e5 (-1e3 in float16), HF's convention, rather than masked.
* Rounds: out_i = sum over rounds, and over the entries of each round's window, of exp(score) v,
  normalised over all of them, which is HF's combination (per-round outputs weighted by the softmax of
  their logsumexps); a key visible in two rounds counts twice.

The rotations are a buffer drawn at init from a generator seeded with `lsh_hash_seed` plus the layer
index, and saved with the model: the same input always hashes the same way, so training and generation agree (a reversible block's recomputation reuses the forward's buckets, see
`LSHAttention.buckets`).

Implementation: one sort per round gives the layout; the pattern becomes an additive float mask per chunk
(0 visible, -inf or <= -1e30 not, -1e5 - x_i.k_i on a token's own slot, so that its score is -1e5); the
chunks go through PyTorch's fused CPU attention kernel (`FusedChunkAttention`, no score matrix stored) or
plain autograd ops (other devices, attention dropout). Memory is linear in the length: the masks are
(rounds * padded length / c) chunks of c x 2c (bidirectional) or c x 3c (causal) entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longlm.attention.backends import fused_cpu_attention, fused_cpu_attention_backward, uses_fused_cpu_chunks
from longlm.attention.base import MixerInputs, TokenMixer
from longlm.attention.registry import MIXERS
from longlm.options import NON_NEGATIVE, POSITIVE, option
from longlm.attention.sorting import ranks_in_order, ranks_in_sorted_groups
from longlm.layers.positions import apply_rotary, rotary_for, rotate_at
from longlm.layers.recompute import is_recomputing

NORM_EPS = 1e-6
STASH_LIMIT = 4  # buckets kept per layer for reversible recomputation (one per pending backward)


def self_score(dtype: torch.dtype) -> float:
    """The score a token gives itself: low enough to lose against any real key, finite in the dtype."""
    return -1e3 if dtype == torch.float16 else -1e5


def draw_rotations(num_heads: int, head_dim: int, num_hashes: int, num_buckets: int, seed: int) -> torch.Tensor:
    """Random rotations (heads, head_dim, rounds, num_buckets // 2), HF's layout, from a seeded generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (num_heads, head_dim, num_hashes, num_buckets // 2 if num_buckets > 1 else 0)
    return torch.randn(shape, generator=generator, device="cpu")


@MIXERS.register("lsh")
class LSHAttention(TokenMixer):
    """Shared-QK LSH attention; `num_buckets`, `num_hashes`, `lsh_chunk_length` from the config.

    With attn_implementation "sdpa" (the default) the chunks run through PyTorch's fused CPU attention kernel
    when it applies (CPU, no attention dropout); "eager" forces the plain autograd path (tests compare the
    two); `longlm.attention.backends` decides.
    """

    supports_kv_cache = True  # causal: every cached key with its buckets and ranks (`_cached_step`)
    options = {
        "num_buckets": option(32, POSITIVE),
        "num_hashes": option(1, POSITIVE),
        "lsh_chunk_length": option(64, POSITIVE),
        "lsh_hash_seed": option(0, NON_NEGATIVE),  # of the fixed random rotations (layer i uses lsh_hash_seed + i)
    }

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.qk_proj = nn.Linear(config.hidden_size, self.inner_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.inner_size, bias=False)
        self.o_proj = nn.Linear(self.inner_size, config.hidden_size, bias=False)
        self.rotary = config.position_embedding_type == "rotary"
        self.num_buckets = config.num_buckets
        self.reversible: bool = config.reversible
        self.num_hashes = config.num_hashes
        self.chunk_length = config.lsh_chunk_length
        self.hash_seed = config.lsh_hash_seed + layer_idx
        self.register_buffer("rotations", self._draw())
        self._stash: list[torch.Tensor] = []  # buckets of reversible forwards, for their recomputation

    def _draw(self) -> torch.Tensor:
        return draw_rotations(self.num_heads, self.head_dim, self.num_hashes, self.num_buckets, self.hash_seed)

    @classmethod
    def check_config(cls, config) -> None:
        buckets = config.num_buckets
        if not isinstance(buckets, int) or buckets < 1 or (buckets > 1 and buckets % 2):
            raise ValueError(f"LongLMConfig.num_buckets must be 1 (no hashing) or a positive even number, got {buckets!r}.")
        if not isinstance(config.num_hashes, int) or config.num_hashes < 1:
            raise ValueError(f"LongLMConfig.num_hashes must be a positive integer (hashing rounds), got {config.num_hashes!r}.")
        if not isinstance(config.lsh_chunk_length, int) or config.lsh_chunk_length < 1:
            raise ValueError(f"LongLMConfig.lsh_chunk_length must be a positive integer, got {config.lsh_chunk_length!r}.")
        if config.mem_len > 0:
            raise ValueError(
                f"The lsh mixer attends within the segment only, so LongLMConfig.mem_len must be 0, got {config.mem_len}."
            )

    def init_extra_parameters(self, init_normal) -> None:
        """The rotations are not learned: redraw them from their seed (a no-op on a fresh module)."""
        with torch.no_grad():
            self.rotations.copy_(self._draw().to(self.rotations.dtype))

    # --- hashing ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """Buckets (B, H, rounds, L) of x (B, H, L, Dh): argmax over [x R; -x R], first index on ties."""
        batch, heads, length, _ = x.shape
        if self.num_buckets == 1:
            return torch.zeros(batch, heads, self.num_hashes, length, dtype=torch.long, device=x.device)
        half = self.num_buckets // 2
        rotations = self.rotations.to(x.dtype).flatten(2)  # (H, Dh, rounds * half)
        rotated = torch.matmul(x, rotations).view(batch, heads, length, self.num_hashes, half)
        top, top_index = rotated.max(dim=-1)
        bottom, bottom_index = rotated.min(dim=-1)
        buckets = torch.where(top >= -bottom, top_index, bottom_index + half)
        return buckets.transpose(2, 3).contiguous()

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """`hash(x)`, except that a reversible block's recomputation reuses the buckets of the forward it
        reruns (as HF does): its input is rebuilt from the block's outputs, equal only up to rounding, and a
        token near a bucket boundary must not change bucket between the forward and its recomputation."""
        stashed = self._stash[-1] if self._stash else None
        if is_recomputing() and stashed is not None and stashed.shape[::3] == (x.shape[0], x.shape[2]):
            return self._stash.pop().to(device=x.device, dtype=torch.long)
        buckets = self.hash(x)
        if self.reversible and self.training and not torch.is_grad_enabled() and not is_recomputing():
            self._stash = self._stash[-(STASH_LIMIT - 1) :] + [buckets.to(torch.int32)]
        return buckets

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        if inputs.memory is not None:
            raise ValueError("The lsh mixer attends within the segment only; it cannot take memory (set mem_len=0).")
        if inputs.cache is not None and inputs.cache.past is not None:
            return self._cached_step(hidden, inputs)
        batch, length, _ = hidden.shape
        heads, head_dim, c = self.num_heads, self.head_dim, self.chunk_length
        x = self.split_heads(self.qk_proj(hidden))
        v = self.split_heads(self.v_proj(hidden))
        if self.rotary:
            cos, sin = rotary_for(inputs.rotary, length, head_dim, self.rope_theta, hidden.device)
            x = apply_rotary(x, cos, sin)
        padded = -(-length // c) * c
        buckets, sentinel = self.buckets(x), self.num_buckets
        hashed = buckets
        documents = None if inputs.documents is None else inputs.documents[:, -length:]
        if documents is not None:
            buckets, sentinel = document_major(buckets, documents, self.num_buckets)
        if inputs.key_mask is not None:
            buckets = buckets.masked_fill(~inputs.key_mask[:, -length:].bool()[:, None, None, :], sentinel)
        if padded > length:
            buckets = F.pad(buckets, (0, padded - length), value=sentinel)
            x, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (x, v))
        keys = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS) * head_dim**-0.5
        packed = torch.cat([x, keys, v], dim=-1).view(-1, 3 * head_dim)  # rows (B*H*n)
        with torch.no_grad():
            plan = SortPlan(buckets, padded, c, extra=2 if inputs.causal else 1)
            self_bias = self_score(x.dtype) - packed[:, :head_dim].mul(packed[:, head_dim : 2 * head_dim]).sum(-1)
            self_bias = self_bias.index_select(0, plan.slot_rows).view(plan.rows, -1)
            if inputs.causal:  # document-major buckets: a bucket's run of slots holds one document only
                bias = causal_bias(plan.sorted_buckets, self_bias, sentinel, c)
            else:
                has_invalid = padded > length or inputs.key_mask is not None
                sorted_documents = None if documents is None else plan.sorted_documents(documents, heads)
                bias = bidirectional_bias(
                    plan.order, plan.sorted_buckets, self_bias, sentinel, c, has_invalid, sorted_documents
                )
        packed = packed.index_select(0, plan.window_rows).view(plan.rows, -1, 3 * head_dim)
        dropout = self.attention_dropout_p
        if uses_fused_cpu_chunks(self.attn_implementation, packed, dropout):
            out = FusedChunkAttention.apply(packed, bias, plan)
        else:
            out = chunk_attention(packed, bias, plan, dropout)
        out = out.view(batch, heads, padded, head_dim)[:, :, :length].to(hidden.dtype)  # the chunk kernels may work in fp32
        if inputs.cache is not None:  # the prompt of a cached generate(): keys, buckets and causal ranks
            ranks = ranks_in_order(plan.sorted_buckets, plan.order)
            ranks = ranks.view(batch, heads, self.num_hashes, padded)[..., :length]
            inputs.cache.write(keys[:, :, :length], v[:, :, :length], extras=(hashed, ranks))
        return self.o_proj(self.merge_heads(out))

    def _cached_step(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        """New tokens after every cached key: the causal rule of the module docstring evaluated directly on the
        cached buckets and ranks (a query's rank = its earlier same-bucket keys), rounds combined by counting
        how many rounds show each key. O(cached keys) per token."""
        slot, c = inputs.cache, self.chunk_length
        x = self.split_heads(self.qk_proj(hidden))
        v = self.split_heads(self.v_proj(hidden))
        if self.rotary:
            x = rotate_at(x, slot.positions, self.rope_theta)
        keys, values = slot.keys_values(x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS) * self.head_dim**-0.5, v)
        buckets = self.hash(x)  # (B, H, R, L)
        all_buckets = slot.extras_with((buckets,))[0]  # (B, H, R, T + L)
        candidates = (buckets[..., None] == all_buckets[..., None, :]) & slot.earlier_keys()[:, None, None]
        ranks = candidates.sum(dim=-1)  # (B, H, R, L)
        all_ranks = torch.cat([slot.past.extras[1], ranks], dim=-1)
        visible = candidates & (all_ranks[..., None, :] >= (ranks // c * c - c)[..., None])
        rounds_shown = visible.sum(dim=2)  # (B, H, L, T + L)
        logits = torch.matmul(x, keys.transpose(-1, -2)).float() + rounds_shown.float().log()
        own = torch.arange(x.shape[2], device=x.device) + slot.past.keys.shape[2]
        own_logit = self_score(x.dtype) + math.log(self.num_hashes)
        logits[..., torch.arange(x.shape[2], device=x.device), own] = own_logit
        out = torch.matmul(torch.softmax(logits, dim=-1).to(values.dtype), values)
        slot.write(keys, values, extras=(all_buckets, all_ranks))
        return self.o_proj(self.merge_heads(out))


def document_major(buckets: torch.Tensor, documents: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, int]:
    """Buckets (B, H, R, L) renumbered document * num_buckets + bucket, and the sentinel bucket above them all.

    Sorting by these puts each document's tokens together, in its own buckets, after every token of the
    earlier documents: a token's rank in its bucket and its chunk then count only its own document's tokens
    (and the *number* of earlier valid tokens), never the content of another document. Documents number at
    most L, so (L + 1) * num_buckets is free for padding without reading `documents` on the host."""
    sentinel = (documents.shape[-1] + 1) * num_buckets
    return buckets + documents[:, None, None, :] * num_buckets, sentinel


class SortPlan:
    """Where every token goes: per round, slots sorted by (bucket, position), rounds concatenated.

    `order` (B*H, R, n): original position of each slot; `sorted_buckets` likewise; `slot_rows`: the row
    of each slot in the flattened (B*H*n) token rows; `window_rows`: the same with `extra` chunks in front
    that only serve as keys (the cyclic previous chunk, or zero-score padding for the causal layout);
    `unsort_rows`: for each slot, its row in the (B*H*R*n) per-round outputs in original order.
    """

    def __init__(self, buckets: torch.Tensor, padded: int, c: int, extra: int) -> None:
        batch, heads, rounds, _ = buckets.shape
        self.rows, self.rounds, self.padded, self.c, self.extra = batch * heads, rounds, padded, c, extra
        device = buckets.device
        sorted_keys, order = torch.sort(buckets * padded + torch.arange(padded, device=device), dim=-1)
        self.sorted_buckets = torch.div(sorted_keys, padded, rounding_mode="floor").view(self.rows, rounds, padded)
        self.order = order.view(self.rows, rounds, padded)
        row_base = torch.arange(self.rows, device=device)[:, None]
        slots = self.order.view(self.rows, rounds * padded) + row_base * padded
        front = slots[:, -c:] if extra == 1 else slots[:, :1].expand(-1, extra * c)  # causal front: any real row
        self.slot_rows = slots.flatten()
        self.window_rows = torch.cat([front, slots], dim=1).flatten()
        unsort = self.order + torch.arange(rounds, device=device)[:, None] * padded + row_base[:, :, None] * rounds * padded
        self.unsort_rows = unsort.flatten()

    def sorted_documents(self, documents: torch.Tensor, heads: int) -> torch.Tensor:
        """(B*H, R * n): the document of every slot (from the tokens' own numbers, so that a padding query
        in the sentinel bucket still keeps to its document; filler slots take the last token's)."""
        batch, length = documents.shape
        if self.padded > length:
            documents = torch.cat([documents, documents[:, -1:].expand(batch, self.padded - length)], dim=1)
        documents = documents[:, None, :].expand(batch, heads, self.padded).reshape(self.rows, self.padded)
        return documents.gather(1, self.order.view(self.rows, -1))


# --- the chunk patterns as additive biases (0 = visible, -inf = not, self = -1e5 - own score) -----------
def visible_to_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, -inf elsewhere: 1 - 1/x on {0, 1}, several times faster than where/masked_fill."""
    return visible.to(dtype).reciprocal_().neg_().add_(1)


def previous_and_own(slots: torch.Tensor, c: int) -> torch.Tensor:
    """(B*H, R * n) per-slot values -> (B*H, chunks, 2c): each chunk's window, the previous chunk (cyclic) first."""
    return torch.cat([slots[:, -c:], slots], dim=1).unfold(1, 2 * c, c)


def bidirectional_bias(
    order, sorted_buckets, self_bias, sentinel: int, c: int, has_invalid: bool, sorted_documents=None
) -> torch.Tensor:
    """(B*H, chunks, c, 2c): a chunk sees itself and the previous chunk of the concatenated rounds (only the
    keys of the query's own document when `sorted_documents` (B*H, R * n) is given)."""
    rows, rounds, padded = sorted_buckets.shape
    chunks = rounds * padded // c
    if sorted_documents is not None:
        key_documents = previous_and_own(sorted_documents, c)[:, :, None, :]
        visible = sorted_documents.view(rows, chunks, c, 1) == key_documents
        if has_invalid:
            visible &= previous_and_own((sorted_buckets != sentinel).view(rows, -1), c)[:, :, None, :]
        bias = visible_to_bias(visible, self_bias.dtype)
    elif has_invalid:
        valid = previous_and_own((sorted_buckets != sentinel).view(rows, -1), c)  # (B*H, chunks, 2c)
        bias = visible_to_bias(valid[:, :, None, :], self_bias.dtype).expand(rows, chunks, c, 2 * c).contiguous()
    else:
        bias = self_bias.new_zeros(rows, chunks, c, 2 * c)
    self_bias = self_bias.view(rows, chunks, c)
    bias[..., c:].diagonal(dim1=-2, dim2=-1).copy_(self_bias)
    # a query's other copies sit in the previous chunk only where that chunk belongs to another round
    firsts = torch.arange(rounds, device=bias.device) * (padded // c)
    positions = order.reshape(rows, chunks, c)
    same = positions[:, firsts, :, None] == positions.roll(1, dims=1)[:, firsts, None, :]
    bias[:, firsts, :, :c] = torch.where(same, self_bias[:, firsts, :, None], bias[:, firsts, :, :c])
    return bias


def causal_bias(sorted_buckets, self_bias, sentinel: int, c: int) -> torch.Tensor:
    """(B*H, chunks, c, 3c): a chunk reads its own and the two previous sorted chunks; a query of bucket
    rank p sees the earlier keys of its bucket (same round) with rank >= c * floor(p / c) - c.

    Those keys are the m = min(p, p mod c + c) slots right before the query's own (a bucket's slots are
    contiguous in the sorted order), so the mask is "slot distance d in [1, m]", built in three passes as
    min(m - d, 0) * 1e30 (0 where visible, <= -1e30 elsewhere); self gets its own score (-1e5 - x.k).
    """
    rows, rounds, padded = sorted_buckets.shape
    chunks, device = rounds * padded // c, sorted_buckets.device
    rank = ranks_in_sorted_groups(sorted_buckets)
    visible = torch.minimum(rank, rank % c + c).masked_fill_(sorted_buckets == sentinel, 0)  # invalid: none
    # slot distance from query i (window slot 2c + i) to window slot j; never visible where it is < 1
    distance = (2 * c + torch.arange(c, device=device))[:, None] - torch.arange(3 * c, device=device)
    work = torch.float64 if self_bias.dtype == torch.float64 else torch.float32  # exact integers up to 2^24
    distance = distance.to(work).masked_fill_(distance < 1, float("inf"))
    bias = visible.to(work).view(rows, chunks, c, 1) - distance
    bias = bias.clamp_(max=0).mul_(1e30).to(self_bias.dtype)
    bias[..., 2 * c :].diagonal(dim1=-2, dim2=-1).copy_(self_bias.view(rows, chunks, c))
    return bias


# --- attention over the chunks, then back to the original order, rounds combined ------------------------
def chunk_views(packed: torch.Tensor, plan: SortPlan):
    """q (B*H, chunks, c, Dh) and key/value windows (B*H, chunks, (extra + 1) c, Dh) as views of `packed`
    (B*H, extra * c + R * n, 3 Dh), whose first `extra` chunks only serve as keys."""
    head_dim, c = packed.shape[-1] // 3, plan.c
    window = (plan.extra + 1) * c
    q = packed[:, plan.extra * c :, :head_dim].unflatten(1, (-1, c))
    k = packed[..., head_dim : 2 * head_dim].unfold(1, window, c).transpose(-1, -2)
    v = packed[..., 2 * head_dim :].unfold(1, window, c).transpose(-1, -2)
    return q, k, v


def unsort_and_combine(out, lse, plan: SortPlan):
    """Sorted per-round outputs (B*H, chunks, c, Dh) and logsumexps -> (B*H, n, Dh) in original order,
    the rounds weighted by the softmax of their logsumexps (returned too, (B*H, R, n); None for one round)."""
    head_dim, rows, rounds, padded = out.shape[-1], plan.rows, plan.rounds, plan.padded
    base = out.new_empty(rows * rounds * padded, head_dim)
    out = torch.index_copy(base, 0, plan.unsort_rows, out.reshape(-1, head_dim)).view(rows, rounds, padded, head_dim)
    if rounds == 1:
        return out[:, 0], None
    lse = torch.index_copy(lse.new_empty(rows * rounds * padded), 0, plan.unsort_rows, lse.reshape(-1))
    weights = torch.softmax(lse.view(rows, rounds, padded), dim=1)
    return (out * weights[..., None]).sum(dim=1), weights


def chunk_attention(packed, bias, plan: SortPlan, dropout: float = 0.0):
    """Plain autograd version (any device, attention dropout)."""
    q, k, v = chunk_views(packed, plan)
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias
    lse = torch.logsumexp(scores, dim=-1) if plan.rounds > 1 else None
    probs = torch.softmax(scores, dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return unsort_and_combine(torch.matmul(probs, v), lse, plan)[0]


class FusedChunkAttention(torch.autograd.Function):
    """PyTorch's fused CPU attention kernel over the chunks; scores are never stored.

    Backward of the round combination: the exact gradient of softmax-over-all-rounds is the per-round
    kernel backward with grad w_r * g and the *combined* output in place of the round's own output (the
    kernel uses the output only in rowsum(grad * out)), so one kernel call does it.
    """

    @staticmethod
    def forward(ctx, packed, bias, plan: SortPlan):
        q, k, v = chunk_views(packed, plan)
        out, lse = fused_cpu_attention(q, k, v, bias, scale=1.0)
        combined, weights = unsort_and_combine(out, lse, plan)
        # the combined output in sorted order (for one round that is the kernel's own output)
        ctx.save_for_backward(packed, bias, lse, weights, out if weights is None else combined)
        ctx.plan = plan
        return combined

    @staticmethod
    def backward(ctx, grad):
        packed, bias, lse, weights, out = ctx.saved_tensors
        plan = ctx.plan
        q, k, v = chunk_views(packed, plan)
        head_dim, c, extra = q.shape[-1], plan.c, plan.extra
        if weights is not None:
            grad = grad[:, None] * weights[..., None]
            out = out.reshape(-1, head_dim).index_select(0, plan.slot_rows).view(q.shape)
        grad_sorted = grad.reshape(-1, head_dim).index_select(0, plan.unsort_rows).view(q.shape)
        # the round weights are float32; the kernel wants its grad and output in the inputs' dtype (bf16 training)
        grad_sorted, out = grad_sorted.to(q.dtype), out.to(q.dtype)
        dq, dk, dv = fused_cpu_attention_backward(grad_sorted, q, k, v, out, lse, bias, scale=1.0)
        d_packed = torch.empty_like(packed)
        length = q.shape[1] * c
        d_packed[:, : extra * c, :head_dim].zero_()
        d_packed[:, extra * c :, :head_dim].unflatten(1, (-1, c)).copy_(dq)
        for part, grad_window in ((1, dk), (2, dv)):  # fold the overlapping windows back onto the slots
            columns = slice(part * head_dim, (part + 1) * head_dim)
            d_packed[:, length:, columns].zero_()
            for j in range(extra + 1):
                target = d_packed[:, j * c : j * c + length, columns].unflatten(1, (-1, c))
                piece = grad_window[:, :, j * c : (j + 1) * c]
                target.copy_(piece) if j == 0 else target.add_(piece)
        return d_packed, None, None
