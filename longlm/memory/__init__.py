"""Memories across segments, one file each, all registered in `MEMORIES` (the across-segment plug point)."""
from longlm.memory.base import MemoryState, SegmentMemory
from longlm.memory.registry import MEMORIES
from longlm.memory.none import NoMemory
from longlm.memory.xl import XLMemory, XLMemoryState

__all__ = ["MEMORIES", "MemoryState", "SegmentMemory", "NoMemory", "XLMemory", "XLMemoryState"]
