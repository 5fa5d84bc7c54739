"""`none`: no state between segments; every segment stands alone."""
from longlm.memory.base import SegmentMemory
from longlm.memory.registry import MEMORIES


@MEMORIES.register("none")
class NoMemory(SegmentMemory):
    carries_context = False
    allows_kv_cache = True
