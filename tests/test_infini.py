"""Infini-attention (`infini` mixer + `infini` memory) against an explicit loop over the paper's equations, and
the plug contract it relies on (the generic suites run it through every preset-parametrized test)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longlm import LongLMConfig, LongLMForCausalLM
from longlm.attention.base import MixerInputs
from longlm.attention.infini import InfiniAttention
from longlm.memory.base import SegmentPass
from longlm.memory.infini import InfiniMemory
from tests.presets_tiny import tiny_preset_config
from tests.sentences import raises_naming

TINY = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, mixer="infini", memory="infini")


def _paper_loop(mixer: InfiniAttention, segments: list[torch.Tensor], delta: bool, rotary: bool) -> list[torch.Tensor]:
    """Eqs. 3-6 of Munkhdalai et al. 2024, one head at a time, one segment after another (causal local
    attention; rotary, when on, only on the local attention's q/k)."""
    heads, dim = mixer.num_heads, mixer.head_dim
    wq, wk, wv = mixer.q_proj.weight, *mixer.kv_proj.weight.chunk(2, dim=0)
    sigma = lambda x: F.elu(x) + 1
    memory = [torch.zeros(dim, dim, dtype=torch.float64) for _ in range(heads)]
    norm = [torch.zeros(dim, dtype=torch.float64) for _ in range(heads)]
    outputs = []
    for x in segments:  # x (L, D), one row
        length = x.shape[0]
        per_head = []
        for h in range(heads):
            rows = slice(h * dim, (h + 1) * dim)
            q, k, v = x @ wq[rows].T, x @ wk[rows].T, x @ wv[rows].T
            if memory_is_empty := bool((norm[h] == 0).all()):
                a_mem = torch.zeros(length, dim, dtype=torch.float64)
            else:
                a_mem = (sigma(q) @ memory[h]) / (sigma(q) @ norm[h])[:, None]
            ql, kl = q, k
            if rotary:
                half = dim // 2
                inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
                angles = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
                cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
                rot = lambda t: t * cos + torch.cat([-t[:, half:], t[:, :half]], -1) * sin
                ql, kl = rot(q), rot(k)
            scores = (ql @ kl.T) / dim**0.5
            scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
            a_dot = scores.softmax(-1) @ v
            g = torch.sigmoid(mixer.gate_bias[h])
            per_head.append(g * a_mem + (1 - g) * a_dot)
            if delta and not memory_is_empty:
                v = v - (sigma(k) @ memory[h]) / (sigma(k) @ norm[h])[:, None]
            memory[h] = memory[h] + sigma(k).T @ v
            norm[h] = norm[h] + sigma(k).sum(0)
        outputs.append(mixer.o_proj(torch.cat(per_head, dim=-1)))
    return outputs


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("positions", ["none", "rotary"])
def test_mixer_and_memory_match_the_papers_equations(delta, positions):
    torch.manual_seed(0)
    config = LongLMConfig(**TINY, infini_delta_rule=delta, position_embedding_type=positions)
    model = LongLMForCausalLM(config).double().eval()
    mixer, memory = model.model.layers[0].block.mixer, model.model.memory
    torch.nn.init.normal_(mixer.gate_bias, std=1.0)
    segments = [torch.randn(1, 6, 16, dtype=torch.float64) for _ in range(3)]
    expected = _paper_loop(mixer, [s[0] for s in segments], delta, positions == "rotary")
    state = None
    with torch.no_grad():
        for segment, want in zip(segments, expected):
            out = mixer(segment, MixerInputs(None, None, True, payload=memory.mixer_payload(state, 0)))
            state = memory.update(state, SegmentPass([segment], segment, None, writes=[out.memory_write]))
            torch.testing.assert_close(out.hidden[0], want, rtol=1e-10, atol=1e-10)


def test_memory_reaches_back_and_gradients_flow_through_it():
    """The second segment's output depends on the first segment's tokens through the memory only, and the
    state keeps the graph (bptt_depth > 1 trains through it)."""
    torch.manual_seed(0)
    model = LongLMForCausalLM(LongLMConfig(**{**TINY, "num_hidden_layers": 2}, bptt_depth=2)).double()
    first = model.model.embed_tokens(torch.randint(3, 200, (1, 5))).detach().requires_grad_(True)
    out1 = model(inputs_embeds=first)
    out2 = model(torch.randint(3, 200, (1, 5)), memory=out1.memory)
    (grad,) = torch.autograd.grad(out2.logits.sum(), first)
    assert grad.abs().sum() > 0
    fresh = model(torch.randint(3, 200, (1, 5)))
    assert fresh.memory.memory[0].shape == (1, 2, 8, 8)  # (B, H, Dk, Dv): fixed size, whatever the context


def test_a_reset_row_reads_an_empty_memory():
    torch.manual_seed(0)
    model = LongLMForCausalLM(LongLMConfig(**TINY)).double().eval()
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        state = model(ids).memory
        reset = state.reset_rows(torch.tensor([True, False]))
        after = model(ids, memory=reset).logits
        torch.testing.assert_close(after[0], model(ids[:1]).logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(after[1], model(ids[1:], memory=state.select_rows(torch.tensor([1]))).logits[0])


def test_the_plug_contract_refuses_mismatched_halves():
    raises_naming(lambda: LongLMConfig(**{**TINY, "memory": "none"}), "'infini'", "memory='infini'", "'none'")
    raises_naming(lambda: LongLMConfig(**{**TINY, "mixer": "full"}), "memory='infini'", "'infini'")
    raises_naming(lambda: LongLMConfig(**TINY, mem_len=4), "mem_len=0")
    raises_naming(lambda: LongLMConfig(**TINY, infini_delta_rule=1), "infini_delta_rule", "True or False")
    # a layer without the infini mixer is fine: it neither reads nor writes the memory
    mixed = LongLMConfig(**{**TINY, "num_hidden_layers": 2, "layer_mixers": ["full", "infini"]})
    assert LongLMForCausalLM(mixed)(torch.randint(3, 200, (1, 4))).memory.memory[0].shape[0] == 1


def test_preset_builds_at_test_size():
    config = tiny_preset_config("infini")
    assert config.infini_delta_rule and set(config.mixers) == {"infini"} and config.memory == "infini"
    assert InfiniAttention.options["infini_delta_rule"].default is False  # the option lives with its mixer
    assert not LongLMConfig().infini_delta_rule  # and every config carries it
