"""Segment order for ordered-stream training, resumable mid-epoch."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, Sampler

from longlm.data.streams import SegmentStreams


class SegmentDataset(Dataset):
    """Item k is the whole batch for segment k (used with `DataLoader(batch_size=None)`).

    With `group` g > 1 (truncated BPTT through g segments), item k is the list of the g consecutive
    segment batches g*k, ..., g*k + g - 1; a last incomplete group is dropped.
    """

    def __init__(self, streams: SegmentStreams, group: int = 1) -> None:
        if not isinstance(group, int) or group < 1:
            raise ValueError(f"group must be a positive integer, got {group!r}.")
        self.streams, self.group = streams, group

    def __len__(self) -> int:
        return len(self.streams) // self.group

    def __getitem__(self, index: int):
        if self.group == 1:
            return self.streams.segment(index)
        if not 0 <= index < len(self):
            raise IndexError(f"segment group {index} out of range [0, {len(self)})")
        return [self.streams.segment(index * self.group + i) for i in range(self.group)]


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
