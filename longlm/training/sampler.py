"""Segment order for ordered-stream training, resumable mid-epoch."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, Sampler

from longlm.data.streams import SegmentStreams


class SegmentDataset(Dataset):
    """Item k is the whole batch for segment k (used with `DataLoader(batch_size=None)`)."""

    def __init__(self, streams: SegmentStreams) -> None:
        self.streams = streams

    def __len__(self) -> int:
        return len(self.streams)

    def __getitem__(self, index: int):
        return self.streams.segment(index)


class ResumableSegmentSampler(Sampler[int]):
    """Yields segments in order; the first epoch after a resume starts at `start` instead of 0."""

    def __init__(self, num_segments: int, start: int = 0) -> None:
        self.num_segments = num_segments
        self.start = start % num_segments if num_segments else 0

    def __len__(self) -> int:
        return self.num_segments - self.start

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(range(start, self.num_segments))
