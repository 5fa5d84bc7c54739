"""`routing`: Routing Transformer attention (Roy et al. 2021): local heads plus heads routed by online k-means.

Dense definition. Of the H heads of a layer, the first R = `num_routing_heads` route and the other H - R are
local; w = the layer's `attention_window`, s = w // 2 (keys on each side, Longformer's convention).

Local head: query i sees key j iff |i - j| <= s, (not causal or j <= i), and (key_mask[j] or j == i)
(`windowed_attention`, the `sliding` mixer's pattern).

Routing head h: one shared projection gives queries = keys (the paper's shared-QK routing for causal LMs),
u_i = x_i W_h / ||x_i W_h|| (unit norm); the head attends with q_i = k_i = sqrt(Dh) * u_i (rotated by rotary
positions when `position_embedding_type="rotary"`) and the usual 1/sqrt(Dh) scale, so a score is
sqrt(Dh) * cos(angle). Clusters come from the C = `num_clusters` unit centroids mu_h,c (a buffer, saved with
the model) and the *unrotated* u_i:

* causal (decoder): token i joins cluster c(i) = argmax_c mu_c . u_i (ties: lowest c) -- it depends on the
  token alone, never on later tokens. Padding tokens (key_mask False) join no cluster. r(i) = the number of
  earlier non-padding tokens of cluster c(i) (its rank). Query i sees key j iff c(j) = c(i), j <= i and
  r(i) - r(j) <= s, i.e. its last s same-cluster predecessors and itself; a padding query sees itself only.
* bidirectional: balanced assignment (the paper's "top-k per centroid"): centroid c takes the
  k = ceil(L / C) tokens with the largest mu_c . u_i (padding tokens are taken last), which form group c,
  ranked by position. A member of group c sees the members j of group c with |rank(i) - rank(j)| <= s, j
  not padding (or j == i). A token can be in several groups: its output is the mean of its per-group outputs
  (the paper's scatter-average); a token in no group attends to itself only (its output is its value v_i).

Documents (`MixerInputs.documents`, numbers d(i)): in addition to all of the above, i may attend j only when
d(i) = d(j). The routing heads make this structural, so that a token at or after a document start depends on
nothing before it, bit for bit: clusters and groups are document-major, i.e. every rule above applies within
each document as if it were its own sequence.
* causal: the cluster of i becomes (d(i), c(i)), so r(i) counts only earlier tokens of its own document;
* bidirectional: centroid c takes the k_d = ceil(L_d / C) best tokens of each document d (L_d = its
  number of positions, padding included; padding taken last), which form group (d, c), ranked by position.
The slot layout of a later document then depends on how many tokens precede it, never on what they are.
Local heads apply the rule inside their window (`windowed_attention(documents=...)`).

Every pattern holds O(L * w) pairs: tokens are laid out cluster by cluster in position order ("slots"),
where each pattern is a band of width s in slot order cut at group boundaries, computed blockwise like the
sliding window (`_grouped_band`); the assignment scores are (L, C). With C = 1 and s >= L - 1 both modes are
full (causal) attention. `global_mask` is ignored (the preset's `sliding` layers serve global tokens).

Online k-means (training only, never while `longlm.layers.recompute.is_recomputing()`): after the forward, with
A_c = the non-padding tokens of the whole batch (of every document: the centroids are a parameter-like running
estimate, not attention, and only move after the forward) whose nearest centroid (argmax, as above) is c and
m_c = mean of their detached u_i, every centroid with A_c non-empty becomes
mu_c <- normalize(decay * mu_c + (1 - decay) * m_c), decay = `kmeans_decay`; the others are unchanged.
A recomputed forward (reversible blocks' backward) reuses the centroids of the original forward, so it
rebuilds exactly the same clusters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longlm.attention.base import MixerInputs, TokenMixer
from longlm.attention.backends import attend, uses_flex
from longlm.attention.registry import MIXERS
from longlm.attention.sorting import ranks_in_order
from longlm.attention.windowed import ATTENTION_WINDOW, check_window, is_int, layer_window, windowed_attention
from longlm.options import POSITIVE, Option, is_number, option
from longlm.layers.positions import apply_rotary, rotary_for, rotate_at
from longlm.layers.recompute import is_recomputing

_MAX_BLOCK = 64  # largest query block of the band (see `_grouped_band`)


def check_routing_fields(config) -> None:
    """One clear sentence per bad field read by the `routing` mixer."""
    heads = config.num_attention_heads
    if config.mem_len:
        raise ValueError(
            f"The routing mixer attends within the segment only, so LongLMConfig.mem_len must be 0, got {config.mem_len!r}."
        )
    routing = config.num_routing_heads
    if not is_int(routing) or not 1 <= routing <= heads:
        raise ValueError(
            f"LongLMConfig.num_routing_heads must be an integer in [1, num_attention_heads={heads}], got {routing!r}."
        )
    clusters = config.num_clusters
    if not is_int(clusters) or clusters < 1:
        raise ValueError(f"LongLMConfig.num_clusters must be a positive integer, got {clusters!r}.")
    decay = config.kmeans_decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
        raise ValueError(f"LongLMConfig.kmeans_decay must be a number in (0, 1), got {decay!r}.")
    check_window(config, "routing")


def nearest_centroid(unit: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, R, L, Dh) unit vectors, (R, C, Dh) centroids -> (B, R, L) index of the largest inner product."""
    return torch.einsum("brld,rcd->brlc", unit, centroids.to(unit.dtype)).argmax(dim=-1)


def causal_slots(unit, centroids, key_mask, documents=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the causal assignment: (token of each slot, group of each slot), both (B, R, L).

    Slots hold the tokens sorted by (cluster, position); padding tokens form group C after the clusters.
    With `documents` (B, L) the sort key is document-major, d * (C + 1) + cluster, so a token's rank counts
    only its own document's tokens and a later document's slots depend only on how many precede them."""
    cluster = nearest_centroid(unit, centroids)
    if key_mask is not None:
        cluster = cluster.masked_fill(~key_mask.bool()[:, None, :], centroids.shape[1])
    if documents is not None:
        cluster = documents.long()[:, None, :] * (centroids.shape[1] + 1) + cluster
    groups, slots = torch.sort(cluster, dim=-1, stable=True)
    return slots, groups


def balanced_slots(unit, centroids, key_mask, documents=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the bidirectional assignment: centroid c takes its k = ceil(L / C) best tokens (by position).

    Returns (token of each slot, group of each slot), both (B, R, C * k). With `documents`, see
    `_document_balanced_slots`."""
    num_clusters, length = centroids.shape[1], unit.shape[2]
    scores = torch.einsum("brld,rcd->brcl", unit, centroids.to(unit.dtype))
    if key_mask is not None:  # cos >= -1 > 1 - 4: any real token outranks every padding token
        scores = scores - 4.0 * (~key_mask.bool())[:, None, None, :].to(scores.dtype)
    if documents is not None:
        return _document_balanced_slots(scores, documents.long())
    per_group = math.ceil(length / num_clusters)
    chosen = scores.topk(per_group, dim=-1).indices.sort(dim=-1).values  # (B, R, C, k)
    groups = torch.arange(num_clusters, device=unit.device).repeat_interleave(per_group)
    return chosen.flatten(2), groups.expand_as(chosen.flatten(2))


def _document_balanced_slots(scores: torch.Tensor, documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced assignment per document: centroid c takes the k_d = ceil(L_d / C) best tokens of each
    document d, group d * C + c, by position. `scores` (B, R, C, L), padding already ranked last.

    Returns (slots, groups), both (B, R, C * K) with K = the largest sum of k_d over the rows: centroid c's
    slots are its chosen tokens of every document in position order (so its groups are contiguous runs),
    then filler slots (group -1, token 0) up to K, which attend nothing real and are never written back.
    A document's choice compares only its own tokens' scores (ties: by position)."""
    batch, _, num_clusters, length = scores.shape
    sizes = torch.zeros(batch, int(documents.max()) + 1, dtype=torch.long, device=scores.device)
    sizes.scatter_add_(1, documents, torch.ones_like(documents))  # L_d
    per_group = (sizes + num_clusters - 1) // num_clusters  # k_d
    first = sizes.cumsum(1) - sizes  # a document's first position (numbers never decrease along a row)
    # order every centroid's tokens by (document, score descending, position): two stable sorts
    by_score = scores.sort(dim=-1, descending=True, stable=True).indices
    by_document = documents[:, None, None, :].expand_as(by_score).gather(-1, by_score)
    order = by_score.gather(-1, by_document.sort(dim=-1, stable=True).indices)
    # in that order, position p holds a token of document documents[p] (the numbers, sorted, are the row)
    rank = torch.arange(length, device=scores.device) - first.gather(1, documents)
    taken = (rank < per_group.gather(1, documents))[:, None, None, :]  # (B, 1, 1, L)
    width = int(per_group.sum(1).max())
    chosen = torch.where(taken, order, length).sort(dim=-1).values[..., :width]  # (B, R, C, K) by position
    real = chosen < length
    slots = chosen.masked_fill(~real, 0)
    cluster = torch.arange(num_clusters, device=scores.device)[:, None]
    groups = documents[:, None, None, :].expand(*slots.shape[:-1], length).gather(-1, slots) * num_clusters + cluster
    return slots.flatten(2), groups.masked_fill(~real, -1).flatten(2)


def _grouped_band(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    slots: torch.Tensor,
    groups: torch.Tensor,
    *,
    one_sided: int,
    causal: bool,
    scale: float,
    key_mask: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """Attention in slot order -> (B, R, S, Dh), one output per slot.

    Slot a (token slots[a]) sees slot b iff groups[a] == groups[b], -s <= b - a <= (0 if causal else s) and
    key_mask[slots[b]], or b == a. `k=None` means keys are the queries (shared QK: gathered once). Slots are
    cut into blocks of c = min(ceil(s / 2), 64, S) queries; a block sees the keys from reach = ceil(s / c)
    blocks before it to as many after it (none when causal), as one unfold view, and one SDPA call runs every
    block with its (c, span) boolean mask: work and memory are S * span with span = (2 reach + 1) c <= 2s + 3c
    (causal (reach + 1) c <= s + 2c). Small blocks waste fewer scores than blocks of s (measured fastest).
    """
    batch, heads, _, head_dim = q.shape
    length = slots.shape[-1]
    c = max(1, min(math.ceil(one_sided / 2), _MAX_BLOCK, length))
    blocks = math.ceil(length / c)
    reach = min(math.ceil(one_sided / c), blocks - 1) if one_sided > 0 else 0
    left, right = reach * c, (0 if causal else reach * c)
    span = left + c + right
    tail = blocks * c - length

    index = slots[..., None].expand(batch, heads, length, head_dim)
    qs = q.gather(2, index)
    ks = qs if k is None else k.gather(2, index)
    vs = v.gather(2, index)
    qb = F.pad(qs, (0, 0, 0, tail)).unflatten(2, (blocks, c))  # (B, R, blocks, c, Dh)
    kb = F.pad(ks, (0, 0, left, tail + right)).unfold(2, span, c).transpose(-1, -2)  # (B, R, blocks, span, Dh)
    vb = F.pad(vs, (0, 0, left, tail + right)).unfold(2, span, c).transpose(-1, -2)

    # padded slots get group -1: never a real group, and they only meet each other
    group_q = F.pad(groups, (0, tail), value=-1).unflatten(2, (blocks, c))[..., None]
    group_k = F.pad(groups, (left, tail + right), value=-1).unfold(2, span, c)[..., None, :]
    allowed = group_q == group_k  # (B, R, blocks, c, span)
    if key_mask is not None:
        valid = key_mask.bool()[:, None, :].expand(batch, heads, -1).gather(2, slots)
        allowed = allowed & F.pad(valid, (left, tail + right), value=False).unfold(2, span, c)[..., None, :]
    offset = torch.arange(span, device=q.device)[None, :] - left - torch.arange(c, device=q.device)[:, None]
    band = (offset >= -one_sided) & (offset <= (0 if causal else one_sided))
    allowed = (allowed & band) | (offset == 0)
    # 4-D inputs (B R, blocks, ...): SDPA's fused CPU kernel takes no more dimensions
    out = F.scaled_dot_product_attention(
        qb.flatten(0, 1), kb.flatten(0, 1), vb.flatten(0, 1),
        attn_mask=allowed.expand(batch, heads, -1, -1, -1).flatten(0, 1), dropout_p=dropout, scale=scale,
    )
    return out.view(batch, heads, blocks * c, head_dim)[:, :, :length]


def routing_attention(
    q: torch.Tensor,
    v: torch.Tensor,
    unit: torch.Tensor,
    centroids: torch.Tensor,
    *,
    one_sided: int,
    causal: bool,
    scale: float,
    key_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed attention of the routing heads (see the module docstring) -> (B, R, L, Dh).

    `q` (B, R, L, Dh) are the (rotated) shared queries/keys, `unit` the unit vectors that are clustered,
    `centroids` (R, C, Dh), `documents` (B, L) `MixerInputs.documents` (groups never cross documents)."""
    with torch.no_grad():
        make_slots = causal_slots if causal else balanced_slots
        slots, groups = make_slots(unit.detach(), centroids, key_mask, documents)
    out = _grouped_band(
        q, None, v, slots, groups, one_sided=one_sided, causal=causal, scale=scale, key_mask=key_mask, dropout=dropout
    )
    index = slots[..., None].expand_as(out)
    if causal:  # the slots are a permutation of the tokens
        return torch.zeros_like(v).scatter(2, index, out)
    if documents is not None:  # filler slots (group -1) are written to a spare position L, then dropped
        return _average_per_token(out, v, torch.where(groups >= 0, slots, v.shape[2]))
    totals = torch.zeros_like(v).scatter_add(2, index, out)
    counts = torch.zeros(v.shape[:3], dtype=v.dtype, device=v.device).scatter_add(2, slots, torch.ones_like(slots, dtype=v.dtype))
    counts = counts[..., None]
    return torch.where(counts > 0, totals / counts.clamp(min=1), v)


def _average_per_token(out: torch.Tensor, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of each token's per-group outputs (slot a goes to token target[a]; target L is discarded);
    a token in no group keeps its value."""
    batch, heads, length, head_dim = v.shape
    totals = v.new_zeros(batch, heads, length + 1, head_dim).scatter_add(2, target[..., None].expand_as(out), out)
    counts = v.new_zeros(batch, heads, length + 1).scatter_add(2, target, torch.ones_like(target, dtype=v.dtype))
    totals, counts = totals[:, :, :length], counts[:, :, :length, None]
    return torch.where(counts > 0, totals / counts.clamp(min=1), v)


@torch.no_grad()
def kmeans_step(centroids: torch.Tensor, unit: torch.Tensor, key_mask: torch.Tensor | None, decay: float) -> torch.Tensor:
    """One online spherical k-means step (module docstring) -> the new (R, C, Dh) centroids (math in float32,
    or float64 for float64 inputs, outside autocast). It pools the tokens of every document: the centroids are
    a running estimate (a parameter-like EMA), not attention, and they move only after the forward."""
    with torch.autocast(unit.device.type, enabled=False):
        return _kmeans_step(centroids, unit, key_mask, decay)


def _kmeans_step(centroids, unit, key_mask, decay) -> torch.Tensor:
    unit = unit.detach().float() if unit.dtype != torch.float64 else unit.detach()
    old = centroids.to(unit.dtype)
    cluster = nearest_centroid(unit, old)  # (B, R, L)
    weight = torch.ones_like(cluster, dtype=unit.dtype)
    if key_mask is not None:
        weight = weight * key_mask.to(unit.dtype)[:, None, :]
    batch, heads, _, head_dim = unit.shape
    num_clusters = old.shape[1]
    sums = unit.new_zeros(batch, heads, num_clusters, head_dim)
    sums.scatter_add_(2, cluster[..., None].expand(-1, -1, -1, head_dim), unit * weight[..., None])
    counts = unit.new_zeros(batch, heads, num_clusters).scatter_add_(2, cluster, weight)
    sums, counts = sums.sum(0), counts.sum(0)[..., None]  # (R, C, Dh), (R, C, 1)
    means = sums / counts.clamp(min=1)
    moved = F.normalize(decay * old + (1.0 - decay) * means, dim=-1)
    return torch.where(counts > 0, moved, old).to(centroids.dtype)


@MIXERS.register("routing")
class RoutingAttention(TokenMixer):
    """`num_routing_heads` heads routed by online k-means, the rest sliding-window (module docstring).

    Parameters: `q_proj` gives the shared query/key of the routing heads (its first R * Dh outputs) and the
    queries of the local heads; `k_proj` the local heads' keys (absent when every head routes); `v_proj`
    the values of all heads; `o_proj`. Buffer: `centroids` (R, C, Dh), unit rows.
    """

    supports_kv_cache = True  # causal: every cached key with its cluster and rank (`_cached_step`)
    options = {
        "attention_window": ATTENTION_WINDOW,  # the local heads' window
        "num_clusters": option(8, POSITIVE),
        "num_routing_heads": option(2, POSITIVE),
        "kmeans_decay": Option(0.999, lambda v: is_number(v) and 0.0 < v < 1.0, "a number in (0, 1)"),
    }

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.num_routing_heads = config.num_routing_heads
        self.num_local_heads = self.num_heads - self.num_routing_heads
        self.one_sided = layer_window(config, layer_idx) // 2
        self.decay = float(config.kmeans_decay)
        self.q_proj = nn.Linear(config.hidden_size, self.inner_size, bias=False)
        local_size = self.num_local_heads * self.head_dim
        self.k_proj = nn.Linear(config.hidden_size, local_size, bias=False) if local_size else None
        self.v_proj = nn.Linear(config.hidden_size, self.inner_size, bias=False)
        self.o_proj = nn.Linear(self.inner_size, config.hidden_size, bias=False)
        self.rotary = config.position_embedding_type == "rotary"
        centroids = torch.randn(self.num_routing_heads, config.num_clusters, self.head_dim)
        self.register_buffer("centroids", F.normalize(centroids, dim=-1))
        self._pass_centroids: torch.Tensor | None = None  # the centroids the last original forward used

    @classmethod
    def check_config(cls, config) -> None:
        check_routing_fields(config)

    def init_extra_parameters(self, init_normal) -> None:
        """Fresh unit centroids (a buffer, so HF's weight init would otherwise leave a meta/empty tensor);
        loaded centroids are kept as they are."""
        from transformers import initialization as init

        drawn = torch.randn(self.centroids.shape, device=self.centroids.device, dtype=torch.float32)
        init.copy_(self.centroids, F.normalize(drawn, dim=-1).to(self.centroids.dtype))

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def _centroids_for_pass(self, update: bool) -> torch.Tensor:
        """The buffer, or in a recomputed forward the centroids its original forward used."""
        if is_recomputing():
            return self.centroids if self._pass_centroids is None else self._pass_centroids
        self._pass_centroids = self.centroids.clone() if update else self.centroids
        return self._pass_centroids

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        if inputs.memory is not None:
            raise ValueError("The routing mixer attends within the segment only; it got memory (set mem_len=0).")
        if inputs.cache is not None and not inputs.causal:
            raise ValueError("A key/value cache needs the causal routing pattern; expected is_decoder=True.")
        if inputs.cache is not None and inputs.cache.past is not None:
            return self._cached_step(hidden, inputs)
        routing = self.num_routing_heads
        key_mask = inputs.key_mask
        update = self.training and not is_recomputing()
        centroids = self._centroids_for_pass(update)
        dropout = self.attention_dropout_p

        q = self.split_heads(self.q_proj(hidden))
        v = self.split_heads(self.v_proj(hidden))
        unit = F.normalize(q[:, :routing], dim=-1)
        shared = unit * math.sqrt(self.head_dim)
        local_q = q[:, routing:]
        local_k = self._heads(self.k_proj(hidden), self.num_local_heads) if self.k_proj is not None else None
        if self.rotary:
            cos, sin = rotary_for(inputs.rotary, hidden.shape[1], self.head_dim, self.rope_theta, hidden.device)
            shared = apply_rotary(shared, cos, sin)
            if local_k is not None:
                local_q, local_k = apply_rotary(local_q, cos, sin), apply_rotary(local_k, cos, sin)

        kwargs = dict(
            one_sided=self.one_sided, causal=inputs.causal, scale=self.scale, key_mask=key_mask, dropout=dropout,
            documents=inputs.documents,
        )
        outs = [routing_attention(shared, v[:, :routing], unit, centroids, **kwargs)]
        if local_k is not None:
            backend = "flex" if uses_flex(self.attn_implementation, dropout) else "blocked"
            outs.append(windowed_attention(local_q, local_k, v[:, routing:], backend=backend, **kwargs))
        if inputs.cache is not None:  # the prompt of a cached generate(): keys, clusters and ranks
            with torch.no_grad():
                slots, groups = causal_slots(unit, centroids, key_mask, inputs.documents)
                clusters, ranks = nearest_centroid(unit, centroids), ranks_in_order(groups, slots)
            keys = shared if local_k is None else torch.cat([shared, local_k], dim=1)
            inputs.cache.write(keys, v, extras=(clusters, ranks))
        if update:
            self.centroids.copy_(kmeans_step(self.centroids, unit, key_mask, self.decay))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.o_proj(self.merge_heads(out))

    def _cached_step(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        """New tokens after every cached key: each routing head's causal rule of the module docstring (same
        cluster, rank within `one_sided`) and each local head's window, evaluated on the cached clusters and
        ranks. O(cached keys) per token (a cluster's predecessors may lie anywhere before)."""
        slot, routing = inputs.cache, self.num_routing_heads
        q = self.split_heads(self.q_proj(hidden))
        v = self.split_heads(self.v_proj(hidden))
        unit = F.normalize(q[:, :routing], dim=-1)
        shared, local_q = unit * math.sqrt(self.head_dim), q[:, routing:]
        local_k = self._heads(self.k_proj(hidden), self.num_local_heads) if self.k_proj is not None else None
        if self.rotary:
            theta = self.rope_theta
            shared, local_q = rotate_at(shared, slot.positions, theta), rotate_at(local_q, slot.positions, theta)
            local_k = None if local_k is None else rotate_at(local_k, slot.positions, theta)
        clusters = nearest_centroid(unit, self.centroids)  # (B, R, L)
        all_clusters = slot.extras_with((clusters,))[0]
        same = (clusters[..., None] == all_clusters[..., None, :]) & slot.earlier_keys()[:, None]  # (B, R, L, K)
        ranks = same.sum(dim=-1)
        all_ranks = torch.cat([slot.past.extras[1], ranks], dim=-1)
        routed = same & (ranks[..., None] - all_ranks[..., None, :] <= self.one_sided)

        def pattern(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
            local = (query_pos - key_pos <= self.one_sided)[:, None].expand(-1, self.num_local_heads, -1, -1)
            return torch.cat([routed, local], dim=1)

        queries = torch.cat([shared, local_q], dim=1)
        new_keys = shared if local_k is None else torch.cat([shared, local_k], dim=1)
        keys, values = slot.keys_values(new_keys, v)
        mask = slot.mask(pattern)
        slot.write(keys, values, extras=(all_clusters, all_ranks))
        out = attend(
            queries, keys, values, mask=mask, causal=False, scale=self.scale, implementation=self.attn_implementation,
        )
        return self.o_proj(self.merge_heads(out))
