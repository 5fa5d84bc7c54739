"""The attention backend switch (`longlm.attention.backends`): every preset gives the same outputs through
every kernel family it can run, chosen the Hugging Face way (`attn_implementation`)."""
from __future__ import annotations

import pytest
import torch

from longlm import LongLMForCausalLM
from longlm.attention.backends import IMPLEMENTATIONS, attend, implementation_of
from longlm.attention.windowed import flex_available
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.sentences import raises_naming

# flex on CPU is FlexAttention's eager reference (forward only, slow): short inputs keep it cheap
CPU_IMPLEMENTATIONS = ["sdpa", "flex_attention"] if flex_available() else ["sdpa"]


def _logits(name: str, implementation: str, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    torch.manual_seed(0)
    model = LongLMForCausalLM(tiny_preset_config(name, attn_implementation=implementation)).double().eval()
    assert all(layer.block.mixer.attn_implementation == implementation for layer in model.model.layers)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_backend_matches_the_eager_reference(name, implementation, padded):
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded and name != "compressive":  # compressive refuses padded batches (tests/test_padding.py)
        mask = torch.ones_like(ids)
        mask[0, :7] = 0
    reference = _logits(name, "eager", ids, mask)
    got = _logits(name, implementation, ids, mask)
    real = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], reference[real], rtol=1e-9, atol=1e-9)


def test_from_pretrained_and_set_attn_implementation_reach_every_mixer(tmp_path):
    model = LongLMForCausalLM(tiny_preset_config("bigbird"))
    assert {layer.block.mixer.attn_implementation for layer in model.model.layers} == {"sdpa"}
    model.save_pretrained(tmp_path)
    eager = LongLMForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert {layer.block.mixer.attn_implementation for layer in eager.model.layers} == {"eager"}
    eager.set_attn_implementation("sdpa")
    assert {layer.block.mixer.attn_implementation for layer in eager.model.layers} == {"sdpa"}


def test_refusals_name_the_backend():
    class Config:
        _attn_implementation = "paged_attention"

    raises_naming(lambda: implementation_of(Config()), "paged_attention", "flex_attention")
    if flex_available():
        model = LongLMForCausalLM(tiny_preset_config("longformer", attention_dropout=0.1, attn_implementation="flex_attention"))
        raises_naming(lambda: model.train()(torch.randint(3, 200, (1, 24))), "flex_attention", "attention_dropout")


@pytest.mark.parametrize("causal", [False, True])
def test_dense_kernels_agree_with_masks_biases_and_memory(causal):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 1, 5, 9, generator=gen) > 0.3
    mask[..., -1] = True
    bias = torch.randn(2, 3, 5, 9, generator=gen, dtype=torch.float64)
    for kwargs in (dict(mask=None), dict(mask=mask), dict(mask=mask, bias=bias), dict(mask=None, bias=bias)):
        outs = [attend(q, k, v, causal=causal, scale=0.3, implementation=i, **kwargs) for i in IMPLEMENTATIONS]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-10, atol=1e-10)
