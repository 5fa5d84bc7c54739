"""Corpora -> token arrays (memory-mapped, cached) -> ordered segment streams."""
from longlm.data.corpus import CORPORA, CorpusSplit, TokenCorpus
from longlm.data.enwik8 import Enwik8Corpus
from longlm.data.pg19 import PG19Corpus
from longlm.data.streams import SegmentStreams

__all__ = ["CORPORA", "CorpusSplit", "TokenCorpus", "Enwik8Corpus", "PG19Corpus", "SegmentStreams"]
