"""Token mixers against dense, loop-free-of-tricks references written here (float64)."""
from __future__ import annotations

import math

import pytest
import torch

from longlm.attention.base import MixerInputs
from longlm.attention.full import FullAttention
from longlm.attention.relative import RelativeAttention
from longlm.layers.positions import sinusoid_table

B, L, D, H = 2, 6, 64, 4
DH = D // H


def _visible(i: int, j: int, memory_length: int, causal: bool, window: int | None) -> bool:
    """May query i (absolute position M + i) attend key j?"""
    query_pos = memory_length + i
    if not causal:
        return True
    return j <= query_pos and (window is None or j > query_pos - window)


def _dense_attention(scores, values, allowed, o_proj_weight):
    """scores (B, H, L, K), values (B, K, H, Dh), allowed (B or 1, L, K) -> (B, L, D)."""
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhlk,bkhd->blhd", probs, values)
    return out.reshape(out.shape[0], out.shape[1], -1) @ o_proj_weight.T


def _allowed(query_length, key_length, memory_length, causal, window, key_mask=None):
    allowed = torch.tensor(
        [[_visible(i, j, memory_length, causal, window) for j in range(key_length)] for i in range(query_length)]
    )[None]
    if key_mask is not None:
        self_key = torch.tensor([[j == memory_length + i for j in range(key_length)] for i in range(query_length)])
        allowed = (allowed & key_mask[:, None, :]) | self_key[None]
    return allowed


# --------------------------------------------------------------------------------------------------
# relative (Transformer-XL)
# --------------------------------------------------------------------------------------------------
def dense_relative(mixer: RelativeAttention, hidden, memory, causal: bool, key_mask=None):
    """score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_r R_{(M+i)-j}) / sqrt(Dh), R per distance directly."""
    config = mixer.config
    memory_length = 0 if memory is None else memory.shape[1]
    keys_in = hidden if memory is None else torch.cat([memory, hidden], dim=1)
    batch, query_length, _ = hidden.shape
    key_length = keys_in.shape[1]
    w_q = mixer.q_proj.weight
    w_k, w_v = mixer.kv_proj.weight.chunk(2, dim=0)
    q = (hidden @ w_q.T).view(batch, query_length, H, DH)
    k = (keys_in @ w_k.T).view(batch, key_length, H, DH)
    v = (keys_in @ w_v.T).view(batch, key_length, H, DH)
    u, pos_bias = mixer.content_bias, mixer.position_bias

    distances = torch.tensor([[memory_length + i - j for j in range(key_length)] for i in range(query_length)])
    if config.clamp_len is not None:
        distances = distances.clamp(-config.clamp_len, config.clamp_len)
    table = torch.stack([sinusoid_table(torch.tensor([int(d)]), D)[0] for d in distances.flatten()])
    table = table.to(hidden.dtype).view(query_length, key_length, D)
    r = (table @ mixer.r_proj.weight.T).view(query_length, key_length, H, DH)

    content = torch.einsum("blhd,bkhd->bhlk", q + u, k)
    position = torch.einsum("blhd,lkhd->bhlk", q + pos_bias, r)
    scores = (content + position) / math.sqrt(DH)
    window = config.mem_len if config.same_length and config.mem_len > 0 else None
    allowed = _allowed(query_length, key_length, memory_length, causal, window, key_mask)
    return _dense_attention(scores, v, allowed, mixer.o_proj.weight)


def _make_relative(tiny_config, **overrides) -> RelativeAttention:
    config = tiny_config("transformer-xl", **overrides)
    mixer = RelativeAttention(config, 0).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.3)
    return mixer


def _check_outputs_and_grads(mixer, reference_fn, hidden, memory, causal, key_mask=None):
    inputs = MixerInputs(memory, key_mask, causal)
    out = mixer(hidden, inputs)
    ref = reference_fn(mixer, hidden, memory, causal, key_mask)
    assert out.shape == (hidden.shape[0], hidden.shape[1], D)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)

    weight = torch.randn_like(out)
    params = [p for p in mixer.parameters()]
    wrt = params + [hidden] + ([] if memory is None else [memory])
    grads = torch.autograd.grad((out * weight).sum(), wrt)
    ref_grads = torch.autograd.grad((ref * weight).sum(), wrt)
    for (name, _), g, rg in zip(list(mixer.named_parameters()) + [("hidden", None), ("memory", None)], grads, ref_grads):
        assert g.abs().sum() > 0, f"zero gradient for {name}"
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("memory_length", [0, 5])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("clamp_len", [None, 3])
def test_relative_matches_dense_reference(tiny_config, memory_length, causal, clamp_len):
    mixer = _make_relative(tiny_config, clamp_len=clamp_len)
    hidden = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, memory_length, D, dtype=torch.float64, requires_grad=True) if memory_length else None
    _check_outputs_and_grads(mixer, dense_relative, hidden, memory, causal)


@pytest.mark.parametrize("memory_length", [0, 5])
def test_relative_same_length_sees_last_mem_len_keys(tiny_config, memory_length):
    mixer = _make_relative(tiny_config, same_length=True, mem_len=4)
    hidden = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, memory_length, D, dtype=torch.float64, requires_grad=True) if memory_length else None
    _check_outputs_and_grads(mixer, dense_relative, hidden, memory, True)
    # The window really bites: same_length differs from plain causal attention for late queries.
    plain = _make_relative(tiny_config, same_length=False, mem_len=4)
    plain.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        a = mixer(hidden, MixerInputs(memory, None, True))
        b = plain(hidden, MixerInputs(memory, None, True))
    assert not torch.allclose(a[:, -1], b[:, -1])
    if memory_length == 0:  # the first mem_len queries see at most mem_len keys either way
        torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-12, atol=1e-12)


def test_relative_key_mask_on_leading_memory_equals_dropping_it(tiny_config):
    mixer = _make_relative(tiny_config)
    hidden = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, 5, D, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(B, 5 + L, dtype=torch.bool)
    key_mask[0, :2] = False
    _check_outputs_and_grads(mixer, dense_relative, hidden, memory, True, key_mask)
    with torch.no_grad():
        masked = mixer(hidden, MixerInputs(memory, key_mask, True))
        dropped = mixer(hidden[:1], MixerInputs(memory[:1, 2:], None, True))
    torch.testing.assert_close(masked[:1], dropped, rtol=1e-10, atol=1e-10)


def test_relative_shift_is_not_trivially_symmetric(tiny_config):
    """The position term must depend on the signed distance: causal and bidirectional differ on the
    queries that can see later keys, and agree nowhere by accident."""
    mixer = _make_relative(tiny_config)
    hidden = torch.randn(1, L, D, dtype=torch.float64)
    with torch.no_grad():
        causal = mixer(hidden, MixerInputs(None, None, True))
        bidirectional = mixer(hidden, MixerInputs(None, None, False))
    torch.testing.assert_close(causal[:, -1], bidirectional[:, -1], rtol=1e-12, atol=1e-12)  # last query sees all
    assert not torch.allclose(causal[:, 0], bidirectional[:, 0])


# --------------------------------------------------------------------------------------------------
# full (rotary + SDPA)
# --------------------------------------------------------------------------------------------------
def _rotate(x, positions, theta):
    """Explicit rotary in the rotate-half layout: pair (x_k, x_{k + Dh/2}) rotated by angle p * theta^(-2k/Dh)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float32) / x.shape[-1]))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, Dh/2); tables are float32, like the module's
    cos = angles.cos().to(x.dtype)[None, :, None, :]  # (1, T, 1, Dh/2)
    sin = angles.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def dense_full(mixer: FullAttention, hidden, memory, causal: bool, key_mask=None):
    config = mixer.config
    memory_length = 0 if memory is None else memory.shape[1]
    keys_in = hidden if memory is None else torch.cat([memory, hidden], dim=1)
    batch, query_length, _ = hidden.shape
    key_length = keys_in.shape[1]
    q = (hidden @ mixer.q_proj.weight.T).view(batch, query_length, H, DH)
    w_k, w_v = mixer.kv_proj.weight.chunk(2, dim=0)
    k = (keys_in @ w_k.T).view(batch, key_length, H, DH)
    v = (keys_in @ w_v.T).view(batch, key_length, H, DH)
    if config.position_embedding_type == "rotary":
        q = _rotate(q, torch.arange(memory_length, key_length), config.rope_theta)
        k = _rotate(k, torch.arange(key_length), config.rope_theta)
    scores = torch.einsum("blhd,bkhd->bhlk", q, k) / math.sqrt(DH)
    window = config.mem_len if config.same_length and config.mem_len > 0 else None
    allowed = _allowed(query_length, key_length, memory_length, causal, window, key_mask)
    return _dense_attention(scores, v, allowed, mixer.o_proj.weight)


def _make_full(tiny_config, **overrides) -> FullAttention:
    config = tiny_config("full", **overrides)
    mixer = FullAttention(config, 0).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.3)
    return mixer


@pytest.mark.parametrize("memory_length", [0, 5])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("position_embedding_type", ["rotary", "none"])
def test_full_matches_dense_reference(tiny_config, memory_length, causal, position_embedding_type):
    mixer = _make_full(tiny_config, position_embedding_type=position_embedding_type)
    hidden = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, memory_length, D, dtype=torch.float64, requires_grad=True) if memory_length else None
    _check_outputs_and_grads(mixer, dense_full, hidden, memory, causal)


def test_full_same_length_matches_dense_reference(tiny_config):
    mixer = _make_full(tiny_config, same_length=True, mem_len=4)
    hidden = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, 5, D, dtype=torch.float64, requires_grad=True)
    _check_outputs_and_grads(mixer, dense_full, hidden, memory, True)


# Rotary cos/sin tables are computed in float32 (the Hugging Face convention) even for a float64 model, so
# results that move every position by the same offset agree only to float32 table precision.
ROTARY_SHIFT_TOL = {"none": 1e-10, "rotary": 1e-5}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("position_embedding_type", ["none", "rotary"])
def test_full_key_mask_on_memory_equals_running_without_those_slots(tiny_config, causal, position_embedding_type):
    mixer = _make_full(tiny_config, position_embedding_type=position_embedding_type)
    tol = ROTARY_SHIFT_TOL[position_embedding_type]
    hidden = torch.randn(3, L, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(3, 5 + L, dtype=torch.bool)
    key_mask[0, :2] = False  # row 0: the two oldest slots are empty
    key_mask[1, :5] = False  # row 1: the whole memory is empty
    _check_outputs_and_grads(mixer, dense_full, hidden, memory, causal, key_mask)
    with torch.no_grad():
        masked = mixer(hidden, MixerInputs(memory, key_mask, causal))
        row0 = mixer(hidden[0:1], MixerInputs(memory[0:1, 2:], None, causal))
        row1 = mixer(hidden[1:2], MixerInputs(None, None, causal))
        row2 = mixer(hidden[2:3], MixerInputs(memory[2:3], None, causal))
    torch.testing.assert_close(masked[0:1], row0, rtol=tol, atol=tol)
    torch.testing.assert_close(masked[1:2], row1, rtol=tol, atol=tol)
    torch.testing.assert_close(masked[2:3], row2, rtol=1e-10, atol=1e-10)  # same positions: exact
    assert not torch.allclose(masked[0:1], mixer(hidden[0:1], MixerInputs(memory[0:1], None, causal)))


def test_rotary_scores_depend_only_on_distance(tiny_config):
    """Shifting every position by the same amount (more memory in front) leaves the output unchanged
    when the extra memory is masked out: positions enter only through q_pos - k_pos."""
    mixer = _make_full(tiny_config)
    hidden = torch.randn(1, L, D, dtype=torch.float64)
    with torch.no_grad():
        plain = mixer(hidden, MixerInputs(None, None, True))
        padding = torch.randn(1, 7, D, dtype=torch.float64)
        key_mask = torch.cat([torch.zeros(1, 7, dtype=torch.bool), torch.ones(1, L, dtype=torch.bool)], dim=1)
        shifted = mixer(hidden, MixerInputs(padding, key_mask, True))
        unmasked = mixer(hidden, MixerInputs(padding, None, True))
    torch.testing.assert_close(plain, shifted, rtol=ROTARY_SHIFT_TOL["rotary"], atol=ROTARY_SHIFT_TOL["rotary"])
    assert (plain - unmasked).abs().max() > 1e-2
