"""Ordered segment streams, the Transformer-XL way.

The token array is cut into B contiguous streams (one per batch row); step k feeds segment k of every
stream, so the memory a row carries always comes from the text just before its current segment.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


class SegmentStreams:
    """tokens -> (B, N // B) streams -> segments of `seg_len` inputs with next-token targets.

    Each segment also says where documents begin: `document_starts` (B, L) per input token, and
    `new_document` (B,) for rows whose segment begins one (or that start the pass).

    With `drop_last=True` (training) every segment has exactly `seg_len` tokens; otherwise (evaluation)
    the last one may be shorter so that every token after a stream's first is predicted once.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seg_len: int,
        doc_starts: np.ndarray | None = None,
        drop_last: bool = True,
    ) -> None:
        if batch_size <= 0 or seg_len <= 0:
            raise ValueError(f"batch_size and segment length must be positive, got {batch_size} and {seg_len}.")
        self.batch_size, self.seg_len, self.drop_last = batch_size, seg_len, drop_last
        self.stream_len = len(tokens) // batch_size
        predicted = self.stream_len - 1
        if predicted < (seg_len if drop_last else 1):
            raise ValueError(
                f"The split has {len(tokens)} tokens, fewer than one segment of {batch_size} streams x "
                f"{seg_len + 1} tokens; use a smaller batch_size or segment length, or more data."
            )
        self.tokens = tokens
        self.num_segments = predicted // seg_len if drop_last else -(-predicted // seg_len)
        self._doc_starts = np.unique(np.asarray(doc_starts if doc_starts is not None else [], dtype=np.int64))

    def __len__(self) -> int:
        return self.num_segments

    def segment(self, index: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= index < self.num_segments:
            raise IndexError(f"segment {index} out of range [0, {self.num_segments})")
        begin = index * self.seg_len
        end = min(begin + self.seg_len, self.stream_len - 1)
        rows = np.arange(self.batch_size)[:, None] * self.stream_len
        cols = np.arange(begin, end + 1)[None, :]
        window = torch.from_numpy(np.asarray(self.tokens[rows + cols], dtype=np.int64))
        positions = (rows + cols)[:, :-1]
        found = np.searchsorted(self._doc_starts, positions).clip(max=max(len(self._doc_starts) - 1, 0))
        starts = self._doc_starts[found] == positions if len(self._doc_starts) else np.zeros(positions.shape, dtype=bool)
        document_starts = torch.from_numpy(starts)
        return {
            "input_ids": window[:, :-1],
            "labels": window[:, 1:],
            "segment": index,
            "new_document": document_starts[:, 0] | (index == 0),
            "document_starts": document_starts,
        }


def memory_for_segment(memory: Any, batch: dict[str, Any]) -> Any:
    """The memory to feed with a segment from `SegmentStreams.segment`: none at the start of a pass, and
    the rows whose segment begins a new document reset (`MemoryState.reset_rows`)."""
    if batch["segment"] == 0 or memory is None:
        return None
    if bool(batch["new_document"].any()):
        return memory.reset_rows(batch["new_document"])
    return memory
