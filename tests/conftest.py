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
