"""`sliding` (Longformer): against a dense float64 reference, `full`, Hugging Face, and the six proofs."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import longlm.attention.sliding  # noqa: F401  (registers the mixer)
from longlm import LongLMConfig, LongLMForCausalLM
from longlm.attention.base import MixerInputs
from longlm.attention.full import FullAttention
from longlm.attention.sliding import SlidingWindowAttention
from longlm.attention.windowed import flex_available, flex_block_mask, windowed_attention
from longlm.layers.positions import apply_rotary, rotary_cos_sin
from tests.memory_probe import largest_tensor_bytes, peak_memory_bytes

B, D, H = 2, 32, 4
DH = D // H


def _config(**overrides) -> LongLMConfig:
    fields = dict(
        num_hidden_layers=2, hidden_size=D, num_attention_heads=H, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_window=8, attention_dilation=1,
    )
    return LongLMConfig.from_preset("longformer", **{**fields, **overrides})


def _mixer(layer_idx: int = 0, **overrides) -> SlidingWindowAttention:
    mixer = SlidingWindowAttention(_config(**overrides), layer_idx).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.3)
    return mixer


# --------------------------------------------------------------------------------------------------
# the dense definition, written out: explicit (B, H, L, L) masks and a plain softmax
# --------------------------------------------------------------------------------------------------
def dense_sliding(mixer: SlidingWindowAttention, hidden, causal: bool, key_mask=None, global_mask=None):
    config = mixer.config
    batch, length, _ = hidden.shape
    window = config.attention_window
    one_sided = (window if isinstance(window, int) else window[mixer.layer_idx]) // 2
    dilation = config.attention_dilation
    if isinstance(dilation, list) and any(isinstance(x, list) for x in dilation):  # one entry per layer
        dilation = dilation[mixer.layer_idx]
    dilation = torch.tensor([dilation] * H if isinstance(dilation, int) else dilation)[None, :, None, None]
    valid = torch.ones(batch, length, dtype=torch.bool) if key_mask is None else key_mask
    is_global = torch.zeros(batch, length, dtype=torch.bool) if global_mask is None else global_mask
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    before = (j <= i) if causal else torch.ones(length, length, dtype=torch.bool)
    band = ((i - j).abs() <= one_sided * dilation) & ((i - j) % dilation == 0)  # (1, H, L, L)
    key_ok = valid[:, None, None, :] & before
    local_allowed = (i == j) | (key_ok & (is_global[:, None, None, :] | band))  # (B, H, L, L)
    global_allowed = ((i == j) | key_ok).expand(batch, H, length, length)

    def heads(x):
        return x.view(batch, length, H, DH).transpose(1, 2)

    def attention(w_q, w_kv, allowed):
        q, (k, v) = heads(hidden @ w_q.T), (heads(hidden @ w.T) for w in w_kv.chunk(2, dim=0))
        if config.position_embedding_type == "rotary":
            cos, sin = rotary_cos_sin(torch.arange(length), DH, config.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(DH)
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v

    out = attention(mixer.q_proj.weight, mixer.kv_proj.weight, local_allowed)
    if global_mask is not None:
        global_out = attention(mixer.q_global_proj.weight, mixer.kv_global_proj.weight, global_allowed)
        out = torch.where(is_global[:, None, :, None], global_out, out)
    return out.transpose(1, 2).reshape(batch, length, D) @ mixer.o_proj.weight.T


def _check(mixer, hidden, causal, key_mask=None, global_mask=None, tol=1e-9):
    out = mixer(hidden, MixerInputs(None, key_mask, causal, global_mask=global_mask))
    ref = dense_sliding(mixer, hidden, causal, key_mask, global_mask)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    weight = torch.randn_like(out)
    names, params = zip(*[(n, p) for n, p in mixer.named_parameters() if global_mask is not None or "global" not in n])
    grads = torch.autograd.grad((out * weight).sum(), [*params, hidden])
    ref_grads = torch.autograd.grad((ref * weight).sum(), [*params, hidden])
    for name, g, rg in zip([*names, "hidden"], grads, ref_grads):
        assert g.abs().sum() > 0, f"zero gradient for {name}"
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _random_masks(length: int, padding: bool, with_global: bool):
    key_mask = global_mask = None
    if padding:
        key_mask = torch.ones(B, length, dtype=torch.bool)
        key_mask[0, -3:] = False  # right padding
        key_mask[1, 2] = False  # a hole
    if with_global:
        global_mask = torch.zeros(B, length, dtype=torch.bool)
        global_mask[0, 0] = global_mask[0, length // 2] = True  # a CLS-like token and one in the middle
        global_mask[1, length - 4] = True
    return key_mask, global_mask


# --------------------------------------------------------------------------------------------------
# 1. equals the dense reference (outputs and gradients, float64)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [16, 13])  # a multiple of the window 8 / of the block 4, and not
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("with_global", [False, True])
def test_matches_dense_reference(causal, length, padding, with_global):
    mixer = _mixer(attention_dilation=[1, 2, 1, 3])  # dilated heads, and two heads sharing dilation 1
    hidden = torch.randn(B, length, D, dtype=torch.float64, requires_grad=True)
    key_mask, global_mask = _random_masks(length, padding, with_global)
    _check(mixer, hidden, causal, key_mask, global_mask)


@pytest.mark.parametrize("causal", [False, True])
def test_batch_of_one_with_unpadded_dilated_groups(causal):
    """Batch 1 and L = 16 = 2 * 8: the dilation-2 sub-sequences need no padding, so the blocked path sees
    strided views it must not assume contiguous (a regression: this once raised in `view`)."""
    mixer = _mixer(attention_dilation=[1, 2, 1, 2])
    hidden = torch.randn(1, 16, D, dtype=torch.float64, requires_grad=True)
    _check(mixer, hidden, causal, None, None)


@pytest.mark.parametrize("causal", [False, True])
def test_per_layer_window_and_dilation_without_rotary(causal):
    """Layer 1 of per-layer schedules picks its own window and per-head dilations; positions off."""
    mixer = _mixer(layer_idx=1, attention_window=[2, 6], attention_dilation=[1, [1, 1, 2, 3]], position_embedding_type="none")
    assert mixer.one_sided == 3 and mixer.dilation == [1, 1, 2, 3]
    hidden = torch.randn(B, 11, D, dtype=torch.float64, requires_grad=True)
    _check(mixer, hidden, causal, *_random_masks(11, True, True))


def test_band_really_is_sparse():
    """A key beyond the window does not move a far query's output; within the window it does."""
    mixer = _mixer(attention_window=4)
    hidden = torch.randn(1, 20, D, dtype=torch.float64)
    with torch.no_grad():
        base = mixer(hidden, MixerInputs(None, None, False))
        changed = hidden.clone()
        changed[0, 10] += 1.0
        moved = mixer(changed, MixerInputs(None, None, False))
    diff = (moved - base).abs().amax(dim=-1)[0]
    assert torch.all(diff[[0, 5, 6, 7, 13, 14, 19]] == 0) and torch.all(diff[8:13] > 0)


# --------------------------------------------------------------------------------------------------
# 2. full coverage equals `full`
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_full_coverage_equals_full(causal, padding):
    """attention_window >= 2 L: w = L keys on each side covers every key of every query, so the band is all."""
    length = 19
    mixer = _mixer(attention_window=2 * length)
    full = FullAttention(mixer.config, 0).double()
    full.load_state_dict({k: v for k, v in mixer.state_dict().items() if k in full.state_dict()})
    hidden = torch.randn(B, length, D, dtype=torch.float64)
    key_mask, _ = _random_masks(length, padding, False)
    inputs = MixerInputs(None, key_mask, causal)
    torch.testing.assert_close(mixer(hidden, inputs), full(hidden, inputs), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# 3. strict causality of the whole decoder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_global", [False, True])
def test_decoder_is_strictly_causal(with_global):
    config = LongLMConfig.from_preset(
        "longformer", num_hidden_layers=2, hidden_size=D, num_attention_heads=H, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_window=[4, 8], attention_dilation=[1, 1, 2, 2],
    )
    model = LongLMForCausalLM(config).eval()
    length = 24
    ids = torch.randint(2, config.vocab_size, (2, length))
    global_mask = torch.zeros(2, length, dtype=torch.long)
    if with_global:
        global_mask[:, [0, 9, 20]] = 1
    for t in (0, 7, 15, 22):
        changed_ids = ids.clone()
        changed_ids[:, t + 1 :] = torch.randint(2, config.vocab_size, (2, length - t - 1))
        changed_global = global_mask.clone()
        if with_global:
            changed_global[:, t + 1 :] = torch.randint(0, 2, (2, length - t - 1))  # global tokens after t move too
        with torch.no_grad():
            a = model(ids, global_attention_mask=global_mask).logits
            b = model(changed_ids, global_attention_mask=changed_global).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


# --------------------------------------------------------------------------------------------------
# 4. memory grows linearly
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_memory_is_linear_at_16k_tokens(causal):
    """Forward + backward of one mixer (d = 32, 2 heads, window 64 so w = 32 keys each side, float32) at
    n = 8192 and 16384 tokens, with 4 global tokens. The main buffers: the key/value neighbourhoods of the
    query blocks (c = 32 queries see span = 96 keys bidirectional, 64 causal; + 4 global keys) and their
    gradients, 4 * 4 * H * n * span * Dh / c bytes ~ 1.5 n window bytes; the (n / c, c, span) boolean block
    mask, ~1.5 n window bytes; the six projections and their gradients, ~ 4 * 8 * n * d bytes (= 4 n window
    here, as d = window / 2); the global rows, O(4 n). So the live peak is ~10 n window bytes;
    `memory_probe.peak_memory_bytes` adds up the allocation events of nested operators (a buffer inside a
    backward node counts at every level), which inflates it (measured: 24 n window causal without global
    tokens, 45 n window bidirectional with them), hence the bound 64 n window bytes (67 MB at 16k; a dense
    float32 score matrix alone would be 4 H n^2 = 2 GiB). Linearity itself: doubling n at most doubles the
    peak (+10%). The largest single tensor stays below n^2 / 32 bytes (8 MiB at 16k; it is the key
    neighbourhoods with the global keys appended, 4 H (n / c) (span + 4) Dh bytes = 6.6 MB, against 1 GiB
    for one dense float32 n x n matrix)."""
    window, heads = 64, 2
    peaks = {}
    for n_tokens in (8192, 16384):
        config = _config(hidden_size=32, num_attention_heads=heads, attention_window=window)
        mixer = SlidingWindowAttention(config, 0)
        hidden = torch.randn(1, n_tokens, 32, requires_grad=True)
        global_mask = torch.zeros(1, n_tokens, dtype=torch.bool)
        global_mask[0, :: n_tokens // 4] = True
        inputs = MixerInputs(None, None, causal=causal, global_mask=global_mask)

        def step():
            mixer(hidden, inputs).sum().backward()

        step()
        peaks[n_tokens] = peak_memory_bytes(step)
        assert peaks[n_tokens] < 64 * n_tokens * window, peaks
    assert peaks[16384] < 2.2 * peaks[8192], peaks
    largest, op = largest_tensor_bytes(step)
    assert largest < 16384**2 / 32, (largest, op)


# --------------------------------------------------------------------------------------------------
# 5. parity with Hugging Face LongformerSelfAttention
# --------------------------------------------------------------------------------------------------
def _hf_pair(window: int):
    """HF's module, randomly initialised, with its six biases zeroed (ours have none), and ours with its
    weights: q_proj = query, kv_proj = [key; value], q_global_proj = query_global, kv_global_proj =
    [key_global; value_global], and o_proj = identity (HF's self-attention returns the context before its
    output dense layer). Positions off (HF Longformer adds learned absolute positions outside this module)."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    hf_config = LongformerConfig(
        hidden_size=D, num_attention_heads=H, attention_window=[window], num_hidden_layers=1,
        attention_probs_dropout_prob=0.0,
    )
    hf = LongformerSelfAttention(hf_config, layer_id=0).double().eval()
    with torch.no_grad():
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            getattr(hf, name).bias.zero_()
    ours = SlidingWindowAttention(_config(attention_window=window, position_embedding_type="none"), 0).double()
    with torch.no_grad():
        ours.q_proj.weight.copy_(hf.query.weight)
        ours.kv_proj.weight.copy_(torch.cat([hf.key.weight, hf.value.weight]))
        ours.q_global_proj.weight.copy_(hf.query_global.weight)
        ours.kv_global_proj.weight.copy_(torch.cat([hf.key_global.weight, hf.value_global.weight]))
        ours.o_proj.weight.copy_(torch.eye(D, dtype=torch.float64))
    return hf, ours


@pytest.mark.parametrize("with_global", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_matches_huggingface_longformer(with_global, padding):
    """Bidirectional (HF Longformer is an encoder); HF needs L to be a multiple of the window. HF computes the
    softmax in float32, hence the 1e-5 tolerance. HF zeroes padded queries' outputs: we compare real tokens."""
    window, length = 8, 24
    hf, ours = _hf_pair(window)
    hidden = torch.randn(B, length, D, dtype=torch.float64)
    key_mask, global_mask = _random_masks(length, padding, with_global)
    if key_mask is not None:
        key_mask[1, 2] = True  # HF's padding is trailing padding: no holes
    valid = torch.ones(B, length, dtype=torch.bool) if key_mask is None else key_mask
    is_global = torch.zeros(B, length, dtype=torch.bool) if global_mask is None else global_mask
    # HF's merged mask: -10000 = no attention, 0 = local, +10000 = global
    hf_mask = torch.zeros(B, length, dtype=torch.float64).masked_fill(is_global, 10000.0).masked_fill(~valid, -10000.0)
    with torch.no_grad():
        expected = hf(
            hidden, attention_mask=hf_mask, is_index_masked=hf_mask < 0, is_index_global_attn=hf_mask > 0,
            is_global_attn=bool(is_global.any()),
        )[0]
        got = ours(hidden, MixerInputs(None, key_mask, False, global_mask=global_mask))
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 6. bad input: one clear sentence each
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attention_window=0), r"attention_window must be a positive integer"),
        (dict(attention_window=-4), r"attention_window must be a positive integer"),
        (dict(attention_window=[8, 8, 8]), r"attention_window lists 3 windows but num_hidden_layers is 2"),
        (dict(attention_window=[8, 0]), r"attention_window must hold positive integers"),
        (dict(attention_dilation=0), r"attention_dilation must be a positive integer"),
        (dict(attention_dilation=[1, 2]), r"attention_dilation lists 2 values but num_attention_heads is 4"),
        (dict(attention_dilation=[1, 1, 0, 1]), r"attention_dilation must hold positive integers"),
        (dict(attention_dilation=[[1, 1, 2, 2]]), r"attention_dilation lists 1 per-layer entries but num_hidden_layers is 2"),
        (dict(attention_dilation=[1, [1, 2]]), r"attention_dilation\[1\] lists 2 values but num_attention_heads is 4"),
        (dict(mem_len=16), r"'sliding' mixer .* needs mem_len=0"),
    ],
)
def test_bad_config_is_one_clear_sentence(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_global_attention_mask_of_wrong_shape_is_rejected():
    model = LongLMForCausalLM(_config()).eval()
    ids = torch.randint(2, 200, (2, 12))
    with pytest.raises(ValueError, match=r"global_attention_mask has shape \(2, 11\); expected the shape of input_ids"):
        model(ids, global_attention_mask=torch.zeros(2, 11, dtype=torch.long))


def test_more_global_tokens_than_the_sequence_is_rejected():
    model = LongLMForCausalLM(_config()).eval()
    ids = torch.randint(2, 200, (2, 12))
    with pytest.raises(ValueError, match=r"global_attention_mask covers 14 positions but the sequence has 12 tokens"):
        model(ids, global_attention_mask=torch.ones(2, 14, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# the FlexAttention path (CUDA fast path) against the blocked path
# --------------------------------------------------------------------------------------------------
def _pattern_case(length: int, causal: bool, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, length, DH, generator=gen, dtype=dtype).to(device) for _ in range(3))
    ek, ev = (torch.randn(B, H, 3, DH, generator=gen, dtype=dtype).to(device) for _ in range(2))
    key_mask = (torch.rand(B, length, generator=gen) > 0.2).to(device)
    extra_mask = (torch.rand(B, 1, length, 3, generator=gen) > 0.5).to(device)
    kwargs = dict(
        one_sided=70, causal=causal, scale=DH**-0.5, key_mask=key_mask, dilation=[1, 2, 3, 1], extra_k=ek,
        extra_v=ev, extra_mask=extra_mask,
    )
    return q, k, v, kwargs


@pytest.mark.skipif(not flex_available(), reason="this torch build has no FlexAttention")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_mask_equals_blocked_path_on_cpu(causal):
    """The flex path's mask_mod (eager FlexAttention on CPU: forward only, slow, so one small case each)."""
    q, k, v, kwargs = _pattern_case(300, causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = windowed_attention(q, k, v, backend="flex", **kwargs)
    blocked = windowed_attention(q, k, v, backend="blocked", **kwargs)
    torch.testing.assert_close(flex, blocked, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not flex_available(), reason="this torch build has no FlexAttention")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_covers_every_allowed_pair(causal):
    """Eager FlexAttention ignores block sparsity, so check the BlockMask itself: every (128 x 128) tile that
    holds an allowed (query, key) pair of the dense pattern is listed."""
    length, one_sided, dilation, extra = 700, 70, [1, 2, 3, 1], 3
    block_mask = flex_block_mask(
        1, H, length, one_sided=one_sided, dilation=dilation, causal=causal, key_mask=None, extra=extra,
        extra_mask=None, device="cpu",
    )
    i = torch.arange(length)[:, None]
    j = torch.arange(length + extra)[None, :]
    d = torch.tensor(dilation)[:, None, None]
    allowed = (j >= length) | (((i - j).abs() <= one_sided * d) & ((i - j) % d == 0) & ((j <= i) | (not causal)))
    tiles = torch.nn.functional.pad(allowed, (0, 768 - length - extra, 0, 768 - length)).view(H, 6, 128, 6, 128)
    needed = tiles.any(dim=4).any(dim=2)
    listed = block_mask.to_dense()[0].bool()
    assert torch.all(listed | ~needed)
    assert listed.float().mean() < 0.8  # and it is sparse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled FlexAttention fast path")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_fast_path_equals_blocked_path_on_cuda(causal):
    q, k, v, kwargs = _pattern_case(1000, causal, dtype=torch.float32, device="cuda")
    fast = windowed_attention(q, k, v, backend="flex", **kwargs)
    blocked = windowed_attention(q, k, v, backend="blocked", **kwargs)
    torch.testing.assert_close(fast, blocked, rtol=2e-3, atol=2e-3)
