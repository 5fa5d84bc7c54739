"""Memories across segments, one file each, all registered in `MEMORIES` (the across-segment plug point)."""
from longlm.memory.base import MemoryState, SegmentMemory
from longlm.memory.registry import MEMORIES
from longlm.memory.none import NoMemory
from longlm.memory.xl import XLMemory, XLMemoryState
from longlm.memory.compressive import CompressiveMemory, CompressiveMemoryState
from longlm.memory.knn import KNNMemory, KNNMemoryState
from longlm.memory.rmt import RMTMemory, RMTMemoryState
from longlm.memory.infini import InfiniMemory, InfiniMemoryState

__all__ = [
    "MEMORIES",
    "MemoryState",
    "SegmentMemory",
    "NoMemory",
    "XLMemory",
    "XLMemoryState",
    "CompressiveMemory",
    "CompressiveMemoryState",
    "KNNMemory",
    "KNNMemoryState",
    "RMTMemory",
    "RMTMemoryState",
    "InfiniMemory",
    "InfiniMemoryState",
]
