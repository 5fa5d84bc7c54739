"""Token mixers, one file each, all registered in `MIXERS` (the per-layer plug point)."""
from longlm.attention.base import MixerInputs, TokenMixer
from longlm.attention.registry import MIXERS
from longlm.attention.full import FullAttention
from longlm.attention.relative import RelativeAttention
from longlm.attention.knn import KNNAttention
from longlm.attention.sliding import SlidingWindowAttention
from longlm.attention.block_sparse import BlockSparseAttention
from longlm.attention.lsh import LSHAttention
from longlm.attention.routing import RoutingAttention
from longlm.attention.infini import InfiniAttention

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
    "InfiniAttention",
]
