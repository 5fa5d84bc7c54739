"""`sliding`: Longformer attention (Beltagy et al. 2020): a sliding window, per-head dilation, global tokens.

Dense definition. Window w = attention_window // 2 keys on each side (`attention_window` is one int or one
per layer), dilation d_h per head (`attention_dilation`: one int, one per head, or one of those per layer),
G = the tokens where `inputs.global_mask` is True, valid(j) = key_mask[b, j] (True when there is no mask),
and before(i, j) = (not causal or j <= i). Every rule below also requires that i and j lie in the same document
(`inputs.documents`, when a document starts inside the segment).

- A non-global query i (projections q_proj / kv_proj) attends key j iff
      j == i, or valid(j) and before(i, j) and (j in G or (|i - j| <= w d_h and (i - j) % d_h == 0)).
- A global query i in G (projections q_global_proj / kv_global_proj, as Longformer's query_global,
  key_global, value_global) attends key j iff j == i, or valid(j) and before(i, j): every key.

So global attention is symmetric: global tokens see everything and everything sees the global tokens (through
the ordinary keys/values), each key counted once. With causal=True every rule is cut to j <= i, which keeps
the decoder strictly causal. Rotary positions (when `position_embedding_type="rotary"`) use absolute
positions for all six projections. Memory is linear in L: the band runs in blocks (`windowed.py`), global
rows cost O(|G| L).
"""
from __future__ import annotations

import torch
from torch import nn

from longlm.attention.base import ContentProjections, MixerInputs, TokenMixer
from longlm.attention.documents import same_document
from longlm.attention.backends import attend, uses_flex
from longlm.attention.kv_cache import cached_step_attention
from longlm.attention.registry import MIXERS
from longlm.attention.windowed import ATTENTION_WINDOW, check_window, is_int, layer_window, windowed_attention
from longlm.options import Option, int_or_int_list, positive_int
from longlm.layers.positions import apply_rotary, rotary_for


def layer_dilation(config, layer_idx: int) -> int | list[int]:
    """The dilation of one layer: `attention_dilation` is one int, one per head (a flat list), or one entry
    per layer (a list holding lists), each entry an int or one int per head."""
    dilation = config.attention_dilation
    if is_int(dilation):
        return dilation
    if any(isinstance(x, (list, tuple)) for x in dilation):
        dilation = dilation[layer_idx]
        if is_int(dilation):
            return dilation
    return [int(x) for x in dilation]


def _check_per_head(value, where: str, heads: int) -> None:
    if isinstance(value, (list, tuple)):
        if len(value) != heads:
            raise ValueError(
                f"LongLMConfig.attention_dilation{where} lists {len(value)} values but num_attention_heads is {heads}; "
                "give one positive integer or one per head."
            )
        if not all(is_int(x) and x > 0 for x in value):
            raise ValueError(f"LongLMConfig.attention_dilation{where} must hold positive integers, got {list(value)!r}.")
    elif not (is_int(value) and value > 0):
        raise ValueError(
            f"LongLMConfig.attention_dilation{where} must be a positive integer or a list of one per head, got {value!r}."
        )


def check_window_fields(config, mixer: str) -> None:
    """One sentence per bad `attention_window` / `attention_dilation`."""
    check_window(config, mixer)
    layers = config.num_hidden_layers
    dilation, heads = config.attention_dilation, config.num_attention_heads
    if isinstance(dilation, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in dilation):
        if len(dilation) != layers:
            raise ValueError(
                f"LongLMConfig.attention_dilation lists {len(dilation)} per-layer entries but num_hidden_layers is "
                f"{layers}; give one int or per-head list per layer."
            )
        for index, entry in enumerate(dilation):
            _check_per_head(entry, f"[{index}]", heads)
    else:
        _check_per_head(dilation, "", heads)


@MIXERS.register("sliding")
class SlidingWindowAttention(TokenMixer):
    """Longformer self-attention: banded local attention plus symmetric global attention (module docstring)."""

    supports_attention_bias = True
    has_global_tokens = True
    supports_kv_cache = True  # causal and without global tokens: a rolling cache of the window (`_cached_step`)
    options = {
        "attention_window": ATTENTION_WINDOW,  # total window w: each token sees w // 2 keys on each side
        # one int, one per head, or one per layer of those
        "attention_dilation": Option(
            1, lambda v: int_or_int_list(v, positive_int), "a positive integer or a list of one per head or per layer"
        ),
    }

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.inner_size, bias=config.attention_bias)
        self.kv_proj = nn.Linear(hidden, 2 * self.inner_size, bias=config.attention_bias)
        self.q_global_proj = nn.Linear(hidden, self.inner_size, bias=config.attention_bias)
        self.kv_global_proj = nn.Linear(hidden, 2 * self.inner_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.inner_size, hidden, bias=config.attention_bias)
        self.one_sided = layer_window(config, layer_idx) // 2
        self.dilation = layer_dilation(config, layer_idx)
        self.rotary = config.position_embedding_type == "rotary"

    @classmethod
    def check_config(cls, config) -> None:
        if config.mem_len > 0:
            raise ValueError(
                f"The 'sliding' mixer attends within the segment only, so it needs mem_len=0, got mem_len={config.mem_len}."
            )
        check_window_fields(config, "sliding")
        # w/2 keys on each side (Longformer's convention, which HF's Longformer enforces): an odd w would
        # silently act as w - 1
        for index in range(config.num_hidden_layers):
            if config.mixers[index] != "sliding":
                continue
            window = config.attention_window
            where, value = ("", window) if is_int(window) else (f"[{index}]", window[index])
            if is_int(value) and value % 2:
                raise ValueError(
                    f"LongLMConfig.attention_window{where} must be even for the 'sliding' mixer (w/2 keys on each "
                    f"side, Longformer's convention), got {value}."
                )

    provides_projections = True

    def content_projections(self) -> ContentProjections:
        return ContentProjections.of(self.q_proj, self.kv_proj, self.num_heads, self.head_dim)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        if inputs.memory is not None:
            raise ValueError("The 'sliding' mixer takes no memory; use memory='none'.")
        if inputs.cache is not None and (inputs.global_mask is not None or not inputs.causal):
            raise ValueError(
                "A cached generate() with the 'sliding' mixer takes no global_attention_mask (a global token would "
                "need every earlier key); expected generation without global tokens, or use_cache=False."
            )
        if inputs.cache is not None and inputs.cache.past is not None:
            return self._cached_step(hidden, inputs)
        length = hidden.shape[1]
        q = self.split_heads(self.q_proj(hidden))
        k, v = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        cos = sin = None
        if self.rotary:
            cos, sin = rotary_for(inputs.rotary, length, self.head_dim, self.rope_theta, hidden.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.attention_dropout_p
        documents = inputs.documents
        common = dict(
            one_sided=self.one_sided, causal=inputs.causal, scale=self.scale, dilation=self.dilation, dropout=dropout,
            documents=documents, backend="flex" if uses_flex(self.attn_implementation, dropout) else "blocked",
        )
        if inputs.global_mask is None:
            out = windowed_attention(q, k, v, key_mask=inputs.key_mask, **common)
            if inputs.cache is not None:  # the prompt of a cached generate(): keep the window's keys
                inputs.cache.write(k, v, span=self._cache_span)
            return self.o_proj(self.merge_heads(out))

        is_global = inputs.global_mask.bool()
        positions, slot_valid = _global_positions(is_global)  # (B, G)
        valid = torch.ones_like(is_global) if inputs.key_mask is None else inputs.key_mask.bool()
        gather = lambda t: t.gather(2, positions[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))  # noqa: E731
        # every query sees the valid global keys (each once: they leave the band), causal: only earlier ones
        extra_mask = (slot_valid & valid.gather(1, positions))[:, None, None, :]
        if inputs.causal:
            query_pos = torch.arange(length, device=hidden.device)
            extra_mask = extra_mask & (positions[:, None, None, :] <= query_pos[None, None, :, None])
        if documents is not None:  # a global key of another document is as hidden as any other key
            extra_mask = extra_mask & same_document(documents, documents.gather(1, positions))[:, None]
        out = windowed_attention(
            q, k, v, key_mask=valid & ~is_global, extra_k=gather(k), extra_v=gather(v), extra_mask=extra_mask, **common
        )
        out = self.merge_heads(out)
        global_out = self._global_rows(hidden, positions, valid, inputs.causal, cos, sin, dropout, documents)
        batch_idx, slot_idx = slot_valid.nonzero(as_tuple=True)
        return self.o_proj(out.index_put((batch_idx, positions[batch_idx, slot_idx]), global_out[batch_idx, slot_idx]))

    @property
    def _cache_span(self) -> int:
        """Keys a causal query can still reach: itself and `one_sided * dilation` earlier positions."""
        largest = self.dilation if is_int(self.dilation) else max(self.dilation)
        return self.one_sided * largest + 1

    def _in_window(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """The band of the module docstring for every head: (B, H, L, K) or (B, L, K) for one dilation."""
        distance = query_pos - key_pos
        if is_int(self.dilation):
            return (distance <= self.one_sided * self.dilation) & (distance % self.dilation == 0)
        dilation = torch.tensor(self.dilation, device=distance.device)[None, :, None, None]
        distance = distance[:, None]
        return (distance <= self.one_sided * dilation) & (distance % dilation == 0)

    def _cached_step(self, hidden: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        """New tokens after the rolling cache of the last `_cache_span` positions: O(window) per token."""
        q = self.split_heads(self.q_proj(hidden))
        k, v = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        theta = self.rope_theta if self.rotary else None
        out = cached_step_attention(
            q, k, v, inputs.cache, pattern=self._in_window, scale=self.scale, rope_theta=theta, span=self._cache_span,
            implementation=self.attn_implementation,
        )
        return self.o_proj(self.merge_heads(out))

    def _global_rows(self, hidden, positions, valid, causal: bool, cos, sin, dropout: float, documents=None) -> torch.Tensor:
        """Outputs of the global tokens (B, G, inner): global projections, every valid (earlier) key of their
        document."""
        length = hidden.shape[1]
        picked = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[2]))
        q = self.split_heads(self.q_global_proj(picked))  # (B, H, G, Dh)
        k, v = (self.split_heads(t) for t in self.kv_global_proj(hidden).chunk(2, dim=-1))
        if cos is not None:
            q = apply_rotary(q, cos[positions][:, None], sin[positions][:, None])
            k = apply_rotary(k, cos, sin)
        key_pos = torch.arange(length, device=hidden.device)[None, None, :]
        mask = valid[:, None, :].expand(-1, positions.shape[1], -1)
        if causal:
            mask = mask & (key_pos <= positions[:, :, None])
        mask = mask | (key_pos == positions[:, :, None])
        if documents is not None:
            mask = mask & same_document(documents.gather(1, positions), documents)
        mask = mask[:, None]  # (B, 1, G, L)
        out = attend(
            q, k, v, mask=mask, causal=False, dropout=dropout, scale=self.scale, implementation=self.attn_implementation,
        )
        return self.merge_heads(out)


def _global_positions(is_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's global tokens, left-aligned and padded with 0: (B, G) long, (B, G) valid."""
    counts = is_global.sum(dim=1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :width]
    slot_valid = torch.arange(width, device=is_global.device)[None, :] < counts[:, None]
    return torch.where(slot_valid, order, torch.zeros_like(order)), slot_valid
