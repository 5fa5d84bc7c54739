"""Loss as a function of the context a decoder may use (the curves of the Transformer-XL and Compressive
Transformer papers): the same split evaluated with several memory lengths, and per-token loss by position
within its document.

`mem_len` 0 means no memory at all (every segment alone); any other value is set on the model's config for
the pass, which every memory reads at each step (`xl`, `compressive`, `knn`'s XL cache). Memories that
are not sized by `mem_len` (RMT's tokens, or none) give the same loss at every value, and the result says so
with `sized_by_mem_len`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from longlm.data.corpus import CorpusSplit
from longlm.evaluation.lm import evaluate_stream

MEM_LENS = (0, 64, 256, 1024, 4096)


def split_prefix(split: CorpusSplit, max_tokens: int | None) -> CorpusSplit:
    """The first `max_tokens` tokens of a split (documents cut where the prefix ends; words counted pro rata)."""
    if max_tokens is None or max_tokens >= len(split.tokens):
        return split
    fraction = max_tokens / len(split.tokens)
    return replace(
        split,
        tokens=split.tokens[:max_tokens],
        doc_starts=split.doc_starts[split.doc_starts < max_tokens],
        num_words=max(1, round(split.num_words * fraction)),
        num_bytes=max(1, round(split.num_bytes * fraction)),
    )


def positions_in_document(token_index: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """For each token index, how many tokens of its document come before it."""
    starts = np.unique(np.concatenate([[0], np.asarray(doc_starts, dtype=np.int64)]))
    owner = np.searchsorted(starts, token_index, side="right") - 1
    return token_index - starts[owner]


def position_bins(limit: int) -> list[int]:
    """Bin edges 0, 64, 128, 256, ... (doubling) up to past `limit`."""
    edges = [0, 64]
    while edges[-1] <= limit:
        edges.append(edges[-1] * 2)
    return edges


def loss_by_context(
    model,
    split: CorpusSplit,
    *,
    tgt_len: int,
    mem_lens: Sequence[int] = MEM_LENS,
    max_tokens: int | None = 65536,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Bits per token at every memory length, and by position within the document for each."""
    split = split_prefix(split, max_tokens)
    rows, by_position = [], []
    for mem_len in mem_lens:
        if mem_len < 0:
            raise ValueError(f"mem_lens must be non-negative integers, got {mem_len}.")
        result = evaluate_stream(
            model, split, tgt_len=tgt_len, mem_len=mem_len or None, batch_size=batch_size,
            carry_memory=mem_len > 0, token_losses=True,
        )
        bits = result["token_nll"] / math.log(2)
        rows.append({"mem_len": mem_len, "bits_per_token": float(bits.mean()), "tokens": int(len(bits))})
        positions = positions_in_document(result["token_index"], split.doc_starts)
        edges = position_bins(int(positions.max()) if len(positions) else 0)
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (positions >= lo) & (positions < hi)
            if inside.any():
                by_position.append({"mem_len": mem_len, "position_from": lo, "position_to": hi,
                                    "bits_per_token": float(bits[inside].mean()), "tokens": int(inside.sum())})
    memory = getattr(getattr(model, "model", model), "memory", None)
    return {
        "by_mem_len": rows,
        "by_position": by_position,
        "sized_by_mem_len": bool(getattr(memory, "sized_by_mem_len", False)),
        "tgt_len": tgt_len,
        "tokens": int(len(split.tokens)),
    }


__all__ = ["loss_by_context", "positions_in_document", "position_bins", "split_prefix", "MEM_LENS"]
