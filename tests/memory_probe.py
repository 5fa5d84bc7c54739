"""CPU memory probes for the "memory grows linearly" proofs: the peak of live tensor bytes while a function
runs (from the profiler's allocation events) and the largest single tensor any operator produced (so a
dense n x n score matrix cannot hide behind a small peak)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


class _LargestOutput(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                size = tensor.numel() * tensor.element_size()
                if size > self.largest:
                    self.largest, self.largest_op = size, str(func)
        return out


def largest_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, str]:
    """(bytes of the largest tensor any operator returned while `fn` ran, that operator's name)."""
    with _LargestOutput() as mode:
        fn()
    return mode.largest, mode.largest_op


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU while `fn` ran, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self_ (not total) usage: an operator's total includes its children's, which are events of their own
    events = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage]
    live = peak = 0
    for _, change in sorted(events):
        live += change
        peak = max(peak, live)
    return peak
