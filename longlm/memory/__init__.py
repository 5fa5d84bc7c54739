"""Memories across segments, one file each, all registered in `MEMORIES` (the across-segment plug point).

Every module of this package is imported here (`import_mechanisms`), so a new memory is one new file that
registers itself with `@MEMORIES.register(name)`; nothing here names it. The classes below are re-exported
for `from longlm.memory import XLMemory`; a memory added later is imported from its own module.
"""
from longlm.registry import import_mechanisms

import_mechanisms(__name__, __path__)

from longlm.memory.base import MemoryState, SegmentMemory  # noqa: E402
from longlm.memory.compressive import CompressiveMemory, CompressiveMemoryState  # noqa: E402
from longlm.memory.knn import KNNMemory, KNNMemoryState  # noqa: E402
from longlm.memory.none import NoMemory  # noqa: E402
from longlm.memory.registry import MEMORIES  # noqa: E402
from longlm.memory.rmt import RMTMemory, RMTMemoryState  # noqa: E402
from longlm.memory.xl import XLMemory, XLMemoryState  # noqa: E402

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
]
