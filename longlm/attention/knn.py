"""`knn`: the kNN-augmented attention layer of the Memorizing Transformer (Wu et al. 2022).

Per head h, with the query q_i of token i:
  local_i  = Transformer-XL relative attention over [xl memory; segment] (`RelativeAttention`, unchanged);
  memory_i = softmax_j(t_h * q̂_i . k̂_j) v_j over the top-k (key, value) pairs j retrieved for (row, h, q_i)
             from the row's store of earlier segments, where x̂ = x / ||x|| and t_h = sqrt(Dh) * exp(s_h);
  out_i    = g_h * memory_i + (1 - g_h) * local_i,   g_h = sigmoid(b_h),
followed by the usual output projection. b_h (the gate bias) and s_h (a log temperature) are learned per
head. Following the paper ("we normalize keys and queries" to limit the staleness of stored keys), the
memory path works on L2-normalised queries and keys, so retrieval is by cosine similarity (maximum inner
product on unit vectors, which is also nearest-L2 on unit vectors); the local path keeps the relative
attention of the other layers. A query for which nothing valid is retrieved (empty store, e.g. at the start
of a document) uses the local attention alone (its gate is taken as 0); so does every token at or after a
document start inside the segment (`MixerInputs.document_starts`), since the store then holds the previous
document's pairs.

The store is the `knn` memory's (`longlm.memory.knn`), handed to this layer as `MixerInputs.payload`. It is
not differentiable: retrieval picks indices without gradient; gradients reach the queries, b_h and s_h.
Retrieval is exact: torch top-k (`knn_backend="torch"`) or faiss flat indexes (`knn_backend="faiss"`),
one per (row, head), so a row only ever sees its own keys and both backends find the same neighbours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longlm.attention.base import MixerInputs, MixerOutput
from longlm.attention.registry import MIXERS
from longlm.attention.relative import RelativeAttention

KNN_BACKENDS = ("torch", "faiss")
_SCORE_BUDGET = 1 << 24  # elements of one (B, H, chunk, S) score block in the torch search


@dataclass
class KNNStore:
    """One layer's store: unit-norm keys and values (B, H, S, Dh) of past tokens; `valid` (B, S)."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    @property
    def size(self) -> int:
        return self.keys.shape[2]


def check_knn_fields(config) -> None:
    """The config fields of the kNN store and retrieval (one clear sentence per bad field)."""
    size, top_k, backend = config.knn_memory_size, config.knn_top_k, config.knn_backend
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"LongLMConfig.knn_memory_size must be a positive integer, got {size!r}.")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"LongLMConfig.knn_top_k must be a positive integer, got {top_k!r}.")
    if top_k > size:
        raise ValueError(
            f"LongLMConfig.knn_top_k ({top_k}) must not exceed knn_memory_size ({size}): "
            "a query cannot retrieve more neighbours than the store holds."
        )
    if backend not in KNN_BACKENDS:
        raise ValueError(f"Unknown knn_backend '{backend}'; expected one of {list(KNN_BACKENDS)}.")


def search_torch(queries: torch.Tensor, store: KNNStore, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product search: (indices (B, H, L, k) into the store, found (B, H, L, k)).

    Invalid slots are never returned as found; with fewer than k valid slots the rest is `found=False`.
    Queries are processed in chunks so the (B, H, chunk, S) score block stays bounded.
    """
    batch, heads, length, _ = queries.shape
    k = min(top_k, store.size)
    chunk = max(1, _SCORE_BUDGET // max(1, batch * heads * store.size))
    invalid = ~store.valid.bool()[:, None, None, :]
    indices, found = [], []
    with torch.no_grad():
        for start in range(0, length, chunk):
            scores = torch.einsum("bhld,bhsd->bhls", queries[:, :, start : start + chunk], store.keys.to(queries.dtype))
            scores.masked_fill_(invalid, float("-inf"))  # in place: a fresh block, no autograd here
            best, index = scores.topk(k, dim=-1)
            indices.append(index)
            found.append(best > float("-inf"))
    return torch.cat(indices, dim=2), torch.cat(found, dim=2)


def _import_faiss():
    try:
        import faiss  # imported lazily: only the faiss backend needs it (and remote-code copies must not)
    except ImportError as error:
        raise ImportError(
            "knn_backend='faiss' needs the faiss package: pip install faiss-cpu (or longlm[knn]); "
            "or use knn_backend='torch' (exact, same neighbours)."
        ) from error
    return faiss


def search_faiss(queries: torch.Tensor, store: KNNStore, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same search as `search_torch` with one exact faiss `IndexFlatIP` per (row, head) over the row's
    valid slots (float32), so a row can only retrieve its own keys."""
    faiss = _import_faiss()
    batch, heads, length, dim = queries.shape
    k = min(top_k, store.size)
    indices = torch.zeros(batch, heads, length, k, dtype=torch.long)
    found = torch.zeros(batch, heads, length, k, dtype=torch.bool)
    keys = store.keys.detach().float().cpu()
    queries = queries.detach().float().cpu()
    valid = store.valid.bool().cpu()
    for row in range(batch):
        slots = valid[row].nonzero().flatten()
        if slots.numel() == 0:
            continue
        for head in range(heads):
            index = faiss.IndexFlatIP(dim)
            index.add(keys[row, head, slots].contiguous().numpy())
            _, ids = index.search(queries[row, head].contiguous().numpy(), k)
            ids = torch.from_numpy(ids)
            hit = ids >= 0
            indices[row, head] = torch.where(hit, slots[ids.clamp(min=0)], torch.zeros_like(ids))
            found[row, head] = hit
    return indices.to(store.keys.device), found.to(store.keys.device)


def retrieve(queries: torch.Tensor, store: KNNStore, top_k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k neighbours of each unit query among the row's valid unit keys, per head."""
    if backend == "faiss":
        return search_faiss(queries, store, top_k)
    return search_torch(queries, store, top_k)


def gather_entries(entries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """entries (B, H, S, Dh), indices (B, H, L, k) -> (B, H, L, k, Dh)."""
    batch, heads, length, k = indices.shape
    flat = indices.reshape(batch, heads, length * k, 1).expand(-1, -1, -1, entries.shape[-1])
    return entries.gather(2, flat).view(batch, heads, length, k, entries.shape[-1])


@dataclass
class KNNEntries:
    """What a knn layer writes after a segment: its (unit key, value) pairs (B, H, L, Dh), detached."""

    keys: torch.Tensor
    values: torch.Tensor


@MIXERS.register("knn")
class KNNAttention(RelativeAttention):
    """Relative local attention plus gated attention over the top-k pairs retrieved from the kNN store."""

    writes = KNNEntries
    requires_memory = "knn"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.gate_bias = nn.Parameter(torch.zeros(self.num_heads))  # b_h, g_h = sigmoid(b_h)
        self.memory_log_scale = nn.Parameter(torch.zeros(self.num_heads))  # s_h, t_h = sqrt(Dh) exp(s_h)

    def configure(self, config) -> None:
        """Retrieval settings an evaluation may change (`model.with_memory(knn_top_k=..., knn_backend=...)`)."""
        super().configure(config)
        self.top_k: int = config.knn_top_k
        self.backend: str = config.knn_backend

    @classmethod
    def check_config(cls, config) -> None:
        if config.memory != "knn":
            raise ValueError(
                f"The knn mixer (layer_mixers={config.mixers}) needs memory='knn', which keeps the store it "
                f"retrieves from; got memory='{config.memory}'."
            )
        check_knn_fields(config)

    def init_extra_parameters(self, init_normal) -> None:
        super().init_extra_parameters(init_normal)
        init_normal(self.gate_bias)
        init_normal(self.memory_log_scale)

    def gate(self) -> torch.Tensor:
        """g_h = sigmoid(b_h), shaped (1, H, 1, 1)."""
        return torch.sigmoid(self.gate_bias)[None, :, None, None]

    def memory_attention(self, queries: torch.Tensor, store: KNNStore) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax(t_h q̂ . k̂) v over the retrieved pairs (B, H, L, Dh), found-anything (B, H, L, 1))."""
        indices, found = retrieve(queries.detach(), store, self.top_k, self.backend)
        keys = gather_entries(store.keys, indices).to(queries.dtype)
        values = gather_entries(store.values, indices).to(queries.dtype)
        scale = math.sqrt(self.head_dim) * self.memory_log_scale.exp()[None, :, None, None]
        scores = torch.einsum("bhld,bhlkd->bhlk", queries, keys) * scale
        scores = scores.masked_fill(~found, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * found
        return torch.einsum("bhlk,bhlkd->bhld", weights, values), found.any(dim=-1, keepdim=True)

    def forward(self, hidden: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        """The output and the segment's (unit key, value) pairs for the `knn` memory's store."""
        local, q, k, v = self.attend_heads(hidden, inputs)
        length = hidden.shape[1]
        unit_q = F.normalize(q, dim=-1)
        entries = KNNEntries(F.normalize(k[:, :, -length:], dim=-1).detach(), v[:, :, -length:].detach())
        store: KNNStore | None = inputs.payload
        if store is None or store.size == 0:
            out = local
        else:
            remote, found = self.memory_attention(unit_q, store)
            if inputs.document_starts is not None:  # tokens of a document begun in this segment: the store is another document's
                found = found & (inputs.document_starts.cumsum(dim=1) == 0)[:, None, :, None]
            gate = self.gate() * found.to(local.dtype)
            out = gate * remote + (1 - gate) * local
        return MixerOutput(self.o_proj(self.merge_heads(out)), entries)
