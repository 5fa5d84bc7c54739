"""Token mixers, one file each, all registered in `MIXERS` (the per-layer plug point).

Every module of this package is imported here (`import_mechanisms`), so a new mixer is one new file that
registers itself with `@MIXERS.register(name)`; nothing here names it. The classes below are re-exported
for `from longlm.attention import FullAttention`; a mixer added later is imported from its own module.
"""
from longlm.registry import import_mechanisms

import_mechanisms(__name__, __path__)

from longlm.attention.base import MixerInputs, TokenMixer  # noqa: E402
from longlm.attention.block_sparse import BlockSparseAttention  # noqa: E402
from longlm.attention.full import FullAttention  # noqa: E402
from longlm.attention.knn import KNNAttention  # noqa: E402
from longlm.attention.lsh import LSHAttention  # noqa: E402
from longlm.attention.registry import MIXERS  # noqa: E402
from longlm.attention.relative import RelativeAttention  # noqa: E402
from longlm.attention.routing import RoutingAttention  # noqa: E402
from longlm.attention.sliding import SlidingWindowAttention  # noqa: E402

__all__ = [
    "MIXERS",
    "MixerInputs",
    "TokenMixer",
    "FullAttention",
    "RelativeAttention",
    "KNNAttention",
    "SlidingWindowAttention",
    "BlockSparseAttention",
    "LSHAttention",
    "RoutingAttention",
]
