"""Shared fixtures: a tiny config factory, so every test builds models in milliseconds."""
from __future__ import annotations

import pytest
import torch

from longlm import LongLMConfig

# The models here are tiny: one thread is fastest, and intra-op threads spin badly when the cores are shared.
torch.set_num_threads(1)

TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=128,
    mem_len=16,
    hidden_dropout_prob=0.0,
)


@pytest.fixture
def tiny_config():
    """`tiny_config(preset="transformer-xl", **overrides)` -> a tiny `LongLMConfig`."""

    def make(preset: str = "transformer-xl", **overrides) -> LongLMConfig:
        return LongLMConfig.from_preset(preset, **{**TINY, **overrides})

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def pg19_train(tmp_path_factory):
    """The PG-19 sample's train split under a 1,000-piece SentencePiece model (real books, real boundaries:
    `.tokens`, `.doc_starts`); skips when ../shared/data is not beside the checkout."""
    from longlm.data import CORPORA
    from tests.paths import PG19_SAMPLE, PG19_VOCAB

    if not PG19_SAMPLE.exists():
        pytest.skip("../shared/data is not beside the checkout")
    corpus = CORPORA.get("pg19")(PG19_SAMPLE, cache_dir=tmp_path_factory.mktemp("pg19"), vocab_size=PG19_VOCAB)
    return corpus.split("train")
