"""Segment order for ordered-stream training, resumable mid-epoch, with each rank on its own streams."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from longlm.data.streams import SegmentStreams


def rank_streams(
    tokens: np.ndarray,
    doc_starts: np.ndarray,
    batch_size: int,
    seg_len: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> SegmentStreams:
    """Rank `rank`'s streams out of `world_size * batch_size` contiguous streams: [rank*B, (rank+1)*B).

    Every stream lives on one rank, so the memory a row carries always comes from its own text; all ranks
    get the same stream length and so the same number of segments (no rank waits on another at the end).
    The split's last `len(tokens) % (world_size * batch_size)` tokens fill no stream and are never seen.
    """
    streams = world_size * batch_size
    stream_len = len(tokens) // streams
    if stream_len - 1 < (seg_len if drop_last else 1):
        raise ValueError(
            f"The split has {len(tokens)} tokens, fewer than {world_size} ranks x {batch_size} streams x "
            f"{seg_len + 1} tokens; use a smaller batch_size or segment length, fewer devices, or more data."
        )
    begin, end = rank * batch_size * stream_len, (rank + 1) * batch_size * stream_len
    starts = np.asarray(doc_starts, dtype=np.int64)
    starts = starts[(starts >= begin) & (starts < end)] - begin
    return SegmentStreams(tokens[begin:end], batch_size, seg_len, starts, drop_last=drop_last)


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


class ResumableSegmentSampler(DistributedSampler):
    """Yields this rank's segments in order; the first epoch after a resume starts at `start` instead of 0.

    The rank split is already done by the data (each rank's dataset holds only its own streams, see
    `rank_streams`). It subclasses `DistributedSampler` only so that Lightning keeps it under DDP/DeepSpeed:
    Lightning replaces any other sampler with one that deals segments out to ranks in turn, which would
    hand a row's next segment to another rank and break the memory it carries.
    """

    def __init__(self, num_segments: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(range(num_segments), num_replicas=world_size, rank=rank, shuffle=False)
        self.num_segments = num_segments
        self.start = start % num_segments if num_segments else 0

    def __len__(self) -> int:
        return self.num_segments - self.start

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(range(start, self.num_segments))


class SegmentLoader(DataLoader):
    """The training loader, resumable through Lightning's stateful-loader protocol.

    Its state is the next segment to train on (`position()`, the count the LM module keeps of the segments
    it consumed, exact whatever the loader prefetched): Lightning saves it with the loops and gives it back
    on resume, and the loader then starts its epoch there. `len()` is the whole epoch, so Lightning's batch
    count of a resumed epoch (restored with the loops) ends where the epoch ends.
    """

    def __init__(self, dataset: SegmentDataset, sampler: ResumableSegmentSampler, position: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, sampler=sampler, **kwargs)
        self._position = position

    def __len__(self) -> int:
        return self.sampler.num_segments

    def state_dict(self) -> dict[str, int]:
        return {"next_train_segment": int(self._position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        group = self.dataset.group
        self.sampler.start = (int(state["next_train_segment"]) // group) % self.sampler.num_segments
