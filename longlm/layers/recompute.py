"""Whether the current forward is a recomputation (reversible blocks' backward), so mixers with side
effects in training (e.g. EMA centroid updates) apply them once per step, not twice."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_state = threading.local()


def is_recomputing() -> bool:
    """True while a block's forward is rerun to rebuild activations for backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def flag_recomputation() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint `context_fn` (non-reentrant): nothing special in forward, `recomputing()` during
    the rerun in backward, so side effects in training apply once."""
    return contextlib.nullcontext(), recomputing()
