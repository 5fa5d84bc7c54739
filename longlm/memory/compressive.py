"""`compressive`: the Compressive Transformer memory (Rae et al. 2020).

Per layer the state holds, like `xl`, the inputs of the last `mem_len` positions, plus a compressed memory
of up to `cmem_len` states; layer i attends over [compressed; memory; segment] (see `context`).

The exact rule. Per layer, think of one stream `[pending; memory; segment inputs]` (oldest first). The
newest `mem_len` states of it are the next memory; the older ones are evicted. Evicted states are cut,
oldest first, into blocks of `compression_rate` states and each full block becomes one compressed state
(`compression_fn`); the compressed memory keeps its last `cmem_len` states. Evicted states that do not
fill a block wait in `pending` (fewer than `rate` states, not attended) until later evictions complete the
block. So block boundaries depend only on the position in the stream, never on segment lengths: feeding
one token at a time (generate) compresses exactly the same blocks as feeding whole segments.
A compressed state is valid only if every state of its block was valid (reset rows, padding).

Compression functions (`compression_fn`, the `COMPRESSIONS` registry below):
- `conv` (default, learned): per layer a 1-D convolution with kernel = stride = rate, initialised to the
  mean pool (so the compressed memory is useful before it is trained) and trained only by the
  attention-reconstruction loss;
- `max`, `mean`: max / mean pool over each block;
- `most_used`: keeps, from each block, the state that received the most attention weight. The weight is
  the content attention softmax((h W_q)(m W_k)^T / sqrt(d)) of the segment that evicts the state, over the
  keys [memory; segment] (causal, invalid slots masked), summed over heads and queries; it is computed
  under no_grad with the layer's own q/k/v projections (`SegmentPass.projections[i]`) and kept in
  `pending_usage` for states that wait for their block.

Attention-reconstruction loss (`auxiliary_losses()["attention_reconstruction"]`, learned compressions only):
per layer, the mean squared difference between attn(h, old) and attn(h, compress(old)), where h are the
current segment's layer inputs, old the evicted states that form full blocks in this update, and
attn(h, m) = softmax((h W_q)(m W_k)^T / sqrt(d)) (m W_v) per head, as in the paper (Algorithm 2); the
layers' losses are averaged. Why not the mixer's forward with a key_mask hiding the segment keys: masks.py
always lets a query see its own key, so every output would mix in the query's own value, and the relative
position term would score old and compressed memories at different distances, so the two sides would not
compare like with like. Memory-only content attention through the mixer's own projections is exactly the
paper's quantity. The main network's parameters enter as detached tensors (`ContentProjections`, which the
skeleton collects from each layer's mixer), and h, old are detached, so the loss trains only the compression; the compressed memory the main
network attends is computed under no_grad, so the LM loss never reaches the compression. When no block is
completed in a step the loss is a zero that still touches the compression parameters (DDP then sees every
parameter used in every step).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from longlm.attention.base import ContentProjections
from longlm.memory.base import MemoryState, SegmentMemory, SegmentPass, last_document_tokens
from longlm.memory.registry import MEMORIES
from longlm.options import NON_NEGATIVE, is_str, option, positive_int_or_none
from longlm.registry import Registry

COMPRESSIONS: Registry[type] = Registry("compression_fn")


# --------------------------------------------------------------------------------------------------
# compression functions: (B, n * rate, D) states (+ (B, n * rate) usage) -> (B, n, D)
# --------------------------------------------------------------------------------------------------
class Compression(nn.Module):
    learned = False  # has parameters trained by the attention-reconstruction loss
    needs_usage = False  # reads the attention weight each state received

    def __init__(self, hidden_size: int, rate: int) -> None:
        super().__init__()
        self.rate = rate

    def blocks(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, dim = states.shape
        return states.view(batch, length // self.rate, self.rate, dim)


@COMPRESSIONS.register("conv")
class ConvCompression(Compression):
    learned = True

    def __init__(self, hidden_size: int, rate: int) -> None:
        super().__init__(hidden_size, rate)
        # weight[out, in, k]: starts as the mean pool (identity / rate on every tap)
        self.weight = nn.Parameter(torch.eye(hidden_size)[:, :, None].repeat(1, 1, rate) / rate)
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, states: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor:
        # the convolution with kernel = stride = rate as one matmul over flattened blocks (faster than conv1d)
        batch, length, dim = states.shape
        flat = states.reshape(batch, length // self.rate, self.rate * dim)  # [k, i] order
        return flat @ self.weight.permute(2, 1, 0).reshape(self.rate * dim, -1) + self.bias


@COMPRESSIONS.register("max")
class MaxPoolCompression(Compression):
    def forward(self, states: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor:
        return self.blocks(states).amax(dim=2)


@COMPRESSIONS.register("mean")
class MeanPoolCompression(Compression):
    def forward(self, states: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor:
        return self.blocks(states).mean(dim=2)


@COMPRESSIONS.register("most_used")
class MostUsedCompression(Compression):
    needs_usage = True

    def forward(self, states: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor:
        blocks = self.blocks(states)
        best = usage.view(blocks.shape[:3]).argmax(dim=2)  # first of equals
        return blocks.gather(2, best[:, :, None, None].expand(-1, -1, 1, blocks.shape[-1]))[:, :, 0]


# --------------------------------------------------------------------------------------------------
# content attention with a layer's own (detached) projections
# --------------------------------------------------------------------------------------------------
def content_attention(
    projections: ContentProjections,
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs (B, H, L, Dh), weights (B, H, L, K)) of softmax((h W_q)(m W_k)^T / sqrt(d)) (m W_v).

    No position terms and no output projection (the paper's attn(h, m)). With `causal_offset` = M, query i
    sees keys j <= M + i (keys = [memory of M; segment])."""
    q = projections.queries(queries)
    k, v = projections.keys_values(keys)
    scores = torch.matmul(q, k.transpose(-1, -2)) * projections.head_dim**-0.5
    allowed = key_valid.bool()[:, None, None, :]
    if causal_offset is not None:
        query_pos = torch.arange(q.shape[2], device=q.device)[:, None] + causal_offset
        allowed = allowed & (torch.arange(k.shape[2], device=q.device)[None, :] <= query_pos)
    weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(dim=-1)
    weights = weights * allowed  # rows without any visible key give zero weights, not a uniform guess
    return torch.matmul(weights, v), weights


# --------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompressiveMemoryState(MemoryState):
    """Per layer i: `hidden[i]` (B, M, D) the xl memory, `compressed[i]` (B, C, D) the compressed memory,
    `pending[i]` (B, P < rate, D) evicted states waiting for a full block (not attended) and
    `pending_usage[i]` (B, P) the attention they received (`most_used`; zeros otherwise). `valid`,
    `compressed_valid`, `pending_valid` mark slots holding real tokens.

    Host-side facts, so the model can skip masking without asking the device: `tokens_since_invalid`
    counts tokens appended since an invalid slot last entered (None: never), `fully_valid` says every
    attended slot is valid.
    """

    hidden: tuple[torch.Tensor, ...]
    valid: torch.Tensor
    compressed: tuple[torch.Tensor, ...]
    compressed_valid: torch.Tensor
    pending: tuple[torch.Tensor, ...]
    pending_valid: torch.Tensor
    pending_usage: tuple[torch.Tensor, ...]
    num_tokens: int = 0
    tokens_since_invalid: int | None = None
    fully_valid: bool = True

    def reset_rows(self, rows: torch.Tensor) -> "CompressiveMemoryState":
        keep = ~rows.to(device=self.valid.device, dtype=torch.bool)

        def clear(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype) for t in tensors)

        return dataclasses.replace(
            self,
            hidden=clear(self.hidden),
            valid=self.valid & keep[:, None],
            compressed=clear(self.compressed),
            compressed_valid=self.compressed_valid & keep[:, None],
            pending=clear(self.pending),
            pending_valid=self.pending_valid & keep[:, None],
            pending_usage=clear(self.pending_usage),
            tokens_since_invalid=0,
            fully_valid=False,
        )

    @property
    def length(self) -> int:
        """Attended slots: compressed plus xl memory."""
        return self.compressed_valid.shape[1] + self.valid.shape[1]


def _span(parts: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along dim 1 of the concatenation of `parts`, as a fresh tensor, without building
    the whole concatenation (no view keeps a larger buffer alive)."""
    pieces, offset = [], 0
    for part in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, part.shape[1])
        if lo < hi:
            pieces.append(part[:, lo:hi])
        offset += part.shape[1]
    return torch.cat(pieces or [parts[-1][:, :0]], dim=1)


@dataclasses.dataclass
class _Cut:
    """Where the stream [pending; memory; segment] of one update is cut (layer independent)."""

    total: int  # stream length
    evicted: int  # oldest `evicted` states leave the memory
    blocked: int  # of those, the oldest `blocked` (a multiple of rate) are compressed now
    valid: list[torch.Tensor]  # validity parts of the stream


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------
@MEMORIES.register("compressive")
class CompressiveMemory(SegmentMemory):
    sized_by_mem_len = True
    reconfigurable_options = ("cmem_len",)
    options = {
        "cmem_len": option(0, NON_NEGATIVE),
        "compression_rate": option(None, (positive_int_or_none, "a positive integer or None")),
        "compression_fn": option("conv", (is_str, "a compression name")),
    }

    def __init__(self, config) -> None:
        super().__init__(config)
        self.rate = config.compression_rate or 1
        if config.cmem_len > 0:
            make = COMPRESSIONS.get(config.compression_fn)
            self.compress = nn.ModuleList(make(config.hidden_size, self.rate) for _ in range(config.num_hidden_layers))
        else:
            self.compress = nn.ModuleList()  # cmem_len=0: exactly the xl memory, no parameters

    @classmethod
    def check_config(cls, config) -> None:
        cmem_len, rate = config.cmem_len, config.compression_rate
        if not isinstance(config.mem_len, int) or config.mem_len <= 0:
            raise ValueError(
                f"memory='compressive' needs mem_len > 0 (compressed states come from those evicted from the "
                f"mem_len memory), got mem_len={config.mem_len!r}."
            )
        if not isinstance(cmem_len, int) or cmem_len < 0:
            raise ValueError(f"LongLMConfig.cmem_len must be a non-negative integer, got {cmem_len!r}.")
        if cmem_len > 0 and rate is None:
            raise ValueError(
                f"LongLMConfig.cmem_len={cmem_len} needs compression_rate (how many evicted states make one "
                "compressed state, e.g. 3)."
            )
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate < 1):
            raise ValueError(f"LongLMConfig.compression_rate must be an integer >= 1, got {rate!r}.")
        if config.compression_fn not in COMPRESSIONS:
            raise ValueError(
                f"Unknown compression_fn {config.compression_fn!r}; expected one of {COMPRESSIONS.names()}."
            )
        if cmem_len > 0 and config.same_length:
            raise ValueError(
                "same_length limits every query to its last mem_len keys, which would hide the compressed "
                "memory; use same_length=False with cmem_len > 0."
            )

    @classmethod
    def needs_projections(cls, config) -> bool:
        """A learned compression (its reconstruction loss) and `most_used` (attention usage) attend through the
        layers' own projections."""
        if config.cmem_len <= 0:
            return False
        compression = COMPRESSIONS.get(config.compression_fn)
        return compression.learned or compression.needs_usage

    def configure(self, config) -> None:
        """`mem_len` and `cmem_len` (an evaluation may lengthen both); a model built without compressed memory has
        no compression weights, so it cannot be given one afterwards."""
        super().configure(config)
        built = getattr(self, "compress", None)  # None while __init__ has not built the compressions yet
        if built is not None and config.cmem_len > 0 and len(built) == 0:
            raise ValueError(
                f"cmem_len={config.cmem_len} was asked of a model built with cmem_len=0, which has no compression "
                "weights; expected cmem_len=0 for this model."
            )
        self.cmem_len: int = config.cmem_len

    @property
    def carries_context(self) -> bool:
        return self.mem_len > 0

    @property
    def learned(self) -> bool:
        return len(self.compress) > 0 and self.compress[0].learned

    # --- read -----------------------------------------------------------------------------------------
    def context(self, state: CompressiveMemoryState | None, layer_idx: int):
        if state is None or state.length == 0:
            return None, None
        if state.compressed_valid.shape[1] == 0:
            return state.hidden[layer_idx], state.valid
        return (
            torch.cat([state.compressed[layer_idx], state.hidden[layer_idx]], dim=1),
            torch.cat([state.compressed_valid, state.valid], dim=1),
        )

    def known_valid_mask(self, state: CompressiveMemoryState | None) -> torch.Tensor | None:
        if state is None or state.length == 0 or state.fully_valid:
            return None
        return torch.cat([state.compressed_valid, state.valid], dim=1)

    # --- write ----------------------------------------------------------------------------------------
    def _cut(self, state: CompressiveMemoryState | None, segment: SegmentPass) -> _Cut:
        first = segment.layer_inputs[0]
        batch, length = first.shape[:2]
        new_valid = (
            torch.ones(batch, length, dtype=torch.bool, device=first.device)
            if segment.token_mask is None
            else segment.token_mask.bool()
        )
        valid = [new_valid] if state is None else [state.pending_valid, state.valid, new_valid]
        starts = segment.document_starts
        if starts is not None and bool(starts.any()):  # nothing from before a row's last document start survives
            older = ~starts.bool().any(dim=1, keepdim=True)
            valid = [v & older for v in valid[:-1]] + [new_valid & last_document_tokens(starts)]
        total = sum(v.shape[1] for v in valid)
        evicted = max(total - self.mem_len, 0)
        blocked = (evicted // self.rate) * self.rate if self.cmem_len > 0 else 0
        return _Cut(total, evicted, blocked, valid)

    def _stream(self, state: CompressiveMemoryState | None, segment: SegmentPass, layer_idx: int) -> list[torch.Tensor]:
        new = segment.layer_inputs[layer_idx].detach()
        return [new] if state is None else [state.pending[layer_idx], state.hidden[layer_idx], new]

    def _usage(self, state: CompressiveMemoryState | None, segment: SegmentPass, layer_idx: int, cut: _Cut) -> list[torch.Tensor]:
        """Attention weight received by every state of the stream (see the module docstring)."""
        new = segment.layer_inputs[layer_idx].detach()
        new_valid = cut.valid[-1]
        if state is None:
            keys, key_valid, memory_length, pending = new, new_valid, 0, []
        else:
            keys = torch.cat([state.hidden[layer_idx], new], dim=1)
            key_valid = torch.cat([cut.valid[1], new_valid], dim=1)  # as this update sees them (documents)
            memory_length, pending = state.valid.shape[1], [state.pending_usage[layer_idx]]
        _, weights = content_attention(segment.projections[layer_idx], new, keys, key_valid, causal_offset=memory_length)
        weights = weights * new_valid[:, None, :, None]  # padding queries do not vote
        return pending + [weights.sum(dim=(1, 2)).to(new.dtype)]

    def check_padding(self, state: CompressiveMemoryState | None, attention_mask: torch.Tensor | None) -> None:
        """Refused: compression blocks are cut at fixed positions of the shared stream, so a padded row's
        blocks (and which states they merge) would differ from the row alone's."""
        raise ValueError(
            "The compressive memory cannot take a padded batch (attention_mask with zeros): its compression blocks "
            "are cut at fixed positions of every row's stream, so padding would change what each row compresses; "
            "expected rows of equal length without padding, such as one row per call."
        )

    @staticmethod
    def _kept_rows(segment: SegmentPass) -> torch.Tensor | bool:
        """(B, 1): rows whose compressed memory survives the segment (no document starts inside it)."""
        if segment.document_starts is None:
            return True
        return ~segment.document_starts.bool().any(dim=1, keepdim=True)

    def update(self, state: CompressiveMemoryState | None, segment: SegmentPass) -> CompressiveMemoryState:
        cut = self._cut(state, segment)
        blocks, kept_from = cut.blocked // self.rate, cut.evicted
        pending_to = cut.evicted if self.cmem_len > 0 else cut.blocked
        hidden, compressed, pending, pending_usage = [], [], [], []
        with torch.no_grad():
            compressed_valid = cut.valid[0][:, :0]
            if blocks:
                block_valid = _span(cut.valid, 0, cut.blocked).view(-1, blocks, self.rate).all(dim=2)
            for i in range(len(segment.layer_inputs)):
                stream = self._stream(state, segment, i)
                hidden.append(_span(stream, kept_from, cut.total))
                pending.append(_span(stream, cut.blocked, pending_to))
                needs_usage = len(self.compress) > 0 and self.compress[i].needs_usage
                usage = self._usage(state, segment, i, cut) if needs_usage else None
                pending_usage.append(
                    _span(usage, cut.blocked, pending_to) if usage is not None else stream[-1].new_zeros(stream[-1].shape[0], pending_to - cut.blocked)
                )
                old = [] if state is None else [state.compressed[i]]
                if blocks:
                    new = self.compress[i](_span(stream, 0, cut.blocked), None if usage is None else _span(usage, 0, cut.blocked))
                    old = old + [new]
                length = sum(t.shape[1] for t in old)
                compressed.append(_span(old, length - self.cmem_len, length) if old else stream[-1][:, :0].clone())
            old_valid = [] if state is None else [state.compressed_valid & self._kept_rows(segment)]
            if blocks:
                old_valid = old_valid + [block_valid]
            if old_valid:
                length = sum(t.shape[1] for t in old_valid)
                compressed_valid = _span(old_valid, length - self.cmem_len, length)
            valid = _span(cut.valid, kept_from, cut.total)
            pending_valid = _span(cut.valid, cut.blocked, pending_to)
        length = segment.layer_inputs[0].shape[1]
        since = None if state is None else state.tokens_since_invalid
        invalidated = segment.token_mask is not None or (segment.document_starts is not None and bool(segment.document_starts.any()))
        since = 0 if invalidated else (None if since is None else since + length)
        horizon = self.mem_len + (self.rate * (self.cmem_len + 1) if self.cmem_len > 0 else 0)
        return CompressiveMemoryState(
            hidden=tuple(hidden),
            valid=valid,
            compressed=tuple(compressed),
            compressed_valid=compressed_valid,
            pending=tuple(pending),
            pending_valid=pending_valid,
            pending_usage=tuple(pending_usage),
            num_tokens=(0 if state is None else state.num_tokens) + length,
            tokens_since_invalid=since,
            fully_valid=since is None or since >= horizon,
        )

    # --- auxiliary loss ----------------------------------------------------------------------------------
    def auxiliary_losses(self, state: CompressiveMemoryState | None, segment: SegmentPass) -> dict[str, torch.Tensor]:
        if not self.learned:
            return {}
        cut = self._cut(state, segment)
        blocks = cut.blocked // self.rate
        if blocks == 0:  # nothing compressed this step: a zero that still reaches every compression parameter
            zero = sum(p.sum() for p in self.compress.parameters()) * 0.0
            return {"attention_reconstruction": zero}
        old_valid = _span(cut.valid, 0, cut.blocked)
        block_valid = old_valid.view(-1, blocks, self.rate).all(dim=2)
        query_valid = cut.valid[-1]
        rows = (query_valid & block_valid.any(dim=1, keepdim=True)).to(segment.layer_inputs[0].dtype)  # (B, L)
        losses = []
        for i, (projections, compress) in enumerate(zip(segment.projections, self.compress)):
            queries = segment.layer_inputs[i].detach()
            old = _span(self._stream(state, segment, i), 0, cut.blocked).detach()
            with torch.no_grad():
                target, _ = content_attention(projections, queries, old, old_valid)
            got, _ = content_attention(projections, queries, compress(old), block_valid)
            error = (got - target).pow(2).mean(dim=(1, 3))  # (B, L): over heads and head dims
            losses.append((error * rows).sum() / rows.sum().clamp(min=1))
        return {"attention_reconstruction": torch.stack(losses).mean()}

    def state_from_dict(self, data: dict[str, Any]) -> CompressiveMemoryState:
        since = data.get("tokens_since_invalid")
        return CompressiveMemoryState(
            hidden=tuple(data["hidden"]),
            valid=data["valid"],
            compressed=tuple(data["compressed"]),
            compressed_valid=data["compressed_valid"],
            pending=tuple(data["pending"]),
            pending_valid=data["pending_valid"],
            pending_usage=tuple(data["pending_usage"]),
            num_tokens=int(data.get("num_tokens", 0)),
            tokens_since_invalid=None if since is None else int(since),
            fully_valid=bool(data.get("fully_valid", False)),
        )
