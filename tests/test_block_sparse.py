"""`block_sparse` (BigBird ITC) against a dense reference written here from the pattern's definition (float64),
against `full` where the pattern covers everything, against Hugging Face's BigBirdBlockSparseAttention, and
for strict causality, linear memory and one-sentence config errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import longlm.attention.block_sparse as bs
from longlm import LongLMConfig, LongLMForCausalLM
from longlm.attention.base import MixerInputs
from longlm.attention.block_sparse import (
    BlockSparseAttention,
    block_sparse_attention,
    flex_block_sparse_attention,
)
from longlm.attention.documents import document_numbers
from longlm.attention.full import FullAttention
from tests.memory_probe import largest_tensor_bytes, peak_memory_bytes

D, H = 32, 2
DH = D // H


def _config(**overrides) -> LongLMConfig:
    fields = {
        "mixer": "block_sparse", "memory": "none", "mem_len": 0, "hidden_size": D, "num_attention_heads": H,
        "num_hidden_layers": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0, "block_size": 4,
        "num_random_blocks": 1, "is_decoder": True,
    }
    return LongLMConfig(**{**fields, **overrides})


def _mixer(layer_idx: int = 0, **overrides) -> BlockSparseAttention:
    mixer = BlockSparseAttention(_config(**overrides), layer_idx).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.3)
    return mixer


# --------------------------------------------------------------------------------------------------
# the dense reference: the module docstring's definition, token pair by token pair
# --------------------------------------------------------------------------------------------------
def _allowed(
    length: int, b: int, r: int, plan: torch.Tensor, causal: bool, key_mask, documents=None, dense_up_to=None
) -> torch.Tensor:
    """(B, H, L, L) bool from the definition; `plan` (H, n, r) holds R_h(i) (-1 = empty slot); `documents`
    (B, L) adds the document rule; `dense_up_to` overrides the fallback threshold as the mixer's does."""
    batch = max(1 if t is None else t.shape[0] for t in (key_mask, documents))
    if dense_up_to is None:
        dense_up_to = ((3 + r) if causal else (5 + 2 * r)) * b
    n = -(-length // b)
    out = torch.zeros(batch, H, length, length, dtype=torch.bool)
    for h in range(H):
        for t in range(length):
            i = t // b
            random = {int(j) for j in plan[h, i] if j >= 0}
            for s in range(length):
                j = s // b
                if length <= dense_up_to:
                    ok = s <= t or not causal
                elif causal:
                    ok = s <= t and (j == 0 or i - j <= 1 or j in random)
                else:
                    ok = i in (0, n - 1) or j in (0, n - 1) or abs(i - j) <= 1 or j in random
                for row in range(batch):
                    valid = key_mask is None or bool(key_mask[row, s]) or s == t
                    same = documents is None or documents[row, t] == documents[row, s]
                    out[row, h, t, s] = ok and valid and bool(same)
    return out


def _rotate(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of (B, L, H, Dh), written out for the reference. The angles are
    float32, as in the library's tables (float64 angles would differ by ~1e-6 at these weight scales)."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) * 2 / x.shape[-1])
    angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * freq[None, :]
    cos, sin = (f(angle).double()[None, :, None, :] for f in (torch.cos, torch.sin))
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def dense_block_sparse(mixer: BlockSparseAttention, hidden, causal: bool, key_mask=None, documents=None):
    batch, length, _ = hidden.shape
    b, r = mixer.block_size, mixer.num_random_blocks
    plan = mixer.random_plan(-(-length // b), causal)
    w_k, w_v = mixer.kv_proj.weight.chunk(2, dim=0)
    q = (hidden @ mixer.q_proj.weight.T).view(batch, length, H, DH)
    k = (hidden @ w_k.T).view(batch, length, H, DH)
    v = (hidden @ w_v.T).view(batch, length, H, DH)
    if mixer.rotary:
        q, k = _rotate(q), _rotate(k)
    scores = torch.einsum("blhd,bkhd->bhlk", q, k) / math.sqrt(DH)
    allowed = _allowed(length, b, r, plan, causal, key_mask, documents, mixer.dense_up_to)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhlk,bkhd->blhd", probs, v).reshape(batch, length, D)
    return out @ mixer.o_proj.weight.T


def _grads(module, hidden, fn):
    hidden = hidden.detach().clone().requires_grad_(True)
    out = fn(module, hidden)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    params = list(module.parameters())
    grads = torch.autograd.grad((out * weights).sum(), [hidden, *params])
    return out, grads


# --------------------------------------------------------------------------------------------------
# 1. equals the dense reference (outputs and gradients), causal and bidirectional
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "length,r,masked",
    [(40, 1, False), (45, 1, False), (45, 2, True), (52, 0, True), (15, 1, False), (18, 1, True)],
    ids=["multiple", "padded", "padded-r2-keymask", "r0-keymask", "short-fallback", "causal-sparse-from-17"],
)
def test_matches_dense_reference(causal, length, r, masked):
    mixer = _mixer(num_random_blocks=r)
    hidden = torch.randn(2, length, D, dtype=torch.float64)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[0, -7:] = False  # right padding
        key_mask[1, 3:9] = False  # holes inside block 0, 1 and 2 (and the query-sees-itself rule)
    inputs = MixerInputs(None, key_mask, causal=causal)
    out, grads = _grads(mixer, hidden, lambda m, x: m(x, inputs))
    ref, ref_grads = _grads(mixer, hidden, lambda m, x: dense_block_sparse(m, x, causal, key_mask))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lengths_sharing_a_block_count_get_their_own_padding():
    """Masks are cached by shape; 45 and 46 tokens both make 12 blocks but pad the last one differently."""
    mixer = _mixer(num_random_blocks=1)
    for length in (45, 46, 45):
        hidden = torch.randn(1, length, D, dtype=torch.float64)
        with torch.no_grad():
            out = mixer(hidden, MixerInputs(None, None, causal=False))
            torch.testing.assert_close(out, dense_block_sparse(mixer, hidden, False), atol=1e-5, rtol=1e-5)


def test_the_pattern_is_sparse_and_follows_the_plan():
    """The reference itself: at 12 blocks each middle query block sees 5 + r blocks (bidirectional) and at
    most 3 + r (causal, where every block but 0 is a middle one); random blocks are distinct, never
    window/global, causal ones strictly earlier than the window."""
    mixer = _mixer(num_random_blocks=2)
    n = 12
    for causal in (False, True):
        plan = mixer.random_plan(n, causal)
        assert plan.shape == (H, n, 2)
        assert (plan[:, [0] if causal else [0, n - 1]] == -1).all()
        for h in range(H):
            for i in range(1, n if causal else n - 1):
                chosen = [int(j) for j in plan[h, i] if j >= 0]
                assert len(set(chosen)) == len(chosen)
                if causal:
                    assert len(chosen) == min(2, max(i - 2, 0)) and all(1 <= j <= i - 2 for j in chosen)
                else:
                    assert len(chosen) == 2 and all(1 <= j <= n - 2 and abs(j - i) > 1 for j in chosen)
    allowed = _allowed(n * 4, 4, 2, mixer.random_plan(n, False), False, None)[0, 0]
    assert allowed[4 * 5].sum() == (5 + 2) * 4 and allowed[0].all() and allowed[-1].all()
    allowed = _allowed(n * 4, 4, 2, mixer.random_plan(n, True), True, None)[0, 0]
    assert allowed[-4].sum() == (3 + 2) * 4 - 3 and allowed[3].sum() == 4  # no global last block


def test_the_random_plan_is_reproducible_and_differs_per_layer():
    first, again, other = _mixer(0), _mixer(0), _mixer(1)
    assert torch.equal(first.random_plan(20, False), again.random_plan(20, False))
    assert not torch.equal(first.random_plan(20, False), other.random_plan(20, False))
    reseeded = BlockSparseAttention(_config(random_blocks_seed=7), 0)
    assert not torch.equal(first.random_plan(20, False), reseeded.random_plan(20, False))
    # fixed in training and eval alike: the plan does not depend on the mode or on the step
    first.train()
    hidden = torch.randn(1, 60, D, dtype=torch.float64)
    out_train = first(hidden, MixerInputs(None, None, causal=False))
    first.eval()
    torch.testing.assert_close(first(hidden, MixerInputs(None, None, causal=False)), out_train)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_the_causal_plan_for_n_blocks_is_the_first_rows_of_the_plan_for_more(r):
    """R_h(i) depends on (seed, layer, head, i) only, so a growing sequence never re-draws a row; the mixer's
    cache (one causal plan grown by doubling, sliced) hands out exactly the direct draw."""
    for n in range(1, 40):
        short = bs.random_block_plan(n, r, 3, causal=True, seed=11)
        longer = bs.random_block_plan(n + 5, r, 3, causal=True, seed=11)
        assert torch.equal(short, longer[:, :n]), n
    growing, fresh = _mixer(0, num_random_blocks=r), _mixer(0, num_random_blocks=r)
    for n in (5, 6, 40, 13, 81, 2):
        direct = bs.random_block_plan(n, r, H, causal=True, seed=growing.seed)
        assert torch.equal(growing.random_plan(n, True), direct)
    assert torch.equal(fresh.random_plan(81, True)[:, :13], growing.random_plan(13, True))


@pytest.mark.parametrize("masked", [False, True])
def test_causal_prefix_forwards_reproduce_the_full_forward(masked):
    """Token-by-token generation: the forward over every prefix (through the full-attention fallback up to
    (3 + r) b = 20 tokens, then the sparse path, whose last block changes at every step) equals the first
    positions of one forward over 70 tokens (17.5 blocks, 3.5x the threshold)."""
    mixer = _mixer(num_random_blocks=2).eval()
    hidden = torch.randn(2, 70, D, dtype=torch.float64)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, 70, dtype=torch.bool)
        key_mask[1, 5:11] = False
        key_mask[0, 30:33] = False
    with torch.no_grad():
        full = mixer(hidden, MixerInputs(None, key_mask, causal=True))
        for t in range(1, 71):
            prefix_mask = None if key_mask is None else key_mask[:, :t]
            prefix = mixer(hidden[:, :t], MixerInputs(None, prefix_mask, causal=True))
            torch.testing.assert_close(prefix, full[:, :t], atol=1e-12, rtol=1e-12, msg=f"prefix of {t} tokens")


# --------------------------------------------------------------------------------------------------
# 2. full coverage equals `full`
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "causal,length,r,dense_up_to",
    [
        (False, 28, 1, None), (True, 16, 1, None), (False, 16, 0, 0), (False, 15, 0, 0), (True, 12, 0, 0),
        (True, 11, 0, 0), (False, 20, 2, 0), (True, 20, 2, 0), (True, 28, 4, 0),
    ],
    ids=[
        "bidir-short-fallback", "causal-short-fallback", "bidir-4-blocks-window+global", "bidir-padded-4-blocks",
        "causal-3-blocks-window+global", "causal-padded-3-blocks", "bidir-5-blocks-window+global+random",
        "causal-5-blocks-window+global+random", "causal-7-blocks-window+global+random",
    ],
)
def test_full_coverage_equals_full(causal, length, r, dense_up_to):
    """At <= (5 + 2r) b tokens (bidirectional fallback) or (3 + r) b (causal fallback), or with the sparse path
    forced where window + global (+ random) blocks already cover every pair (bidirectional: n <= 4 + r; causal:
    n <= 3 + r, the causal fallback's own bound), the mixer equals `full` with the same weights."""
    mixer = _mixer(num_random_blocks=r)
    if dense_up_to is not None:
        mixer.dense_up_to = dense_up_to
    full = FullAttention(mixer.config, 0).double()
    full.load_state_dict(mixer.state_dict())
    hidden = torch.randn(2, length, D, dtype=torch.float64)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, 2:5] = False
    for mask in (None, key_mask):
        inputs = MixerInputs(None, mask, causal=causal)
        out, grads = _grads(mixer, hidden, lambda m, x, inputs=inputs: m(x, inputs))
        ref, ref_grads = _grads(full, hidden, lambda m, x, inputs=inputs: m(x, inputs))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# 3. strict causality of the whole decoder
# --------------------------------------------------------------------------------------------------
def test_decoder_is_strictly_causal():
    """Changing any token after t leaves every logit up to t unchanged (HF's BigBirdForCausalLM with
    block_sparse attention fails this: its global last block and random blocks look ahead)."""
    config = LongLMConfig.from_preset(
        "bigbird", num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, block_size=4, num_random_blocks=2, mem_len=0,
    )
    model = LongLMForCausalLM(config).eval()
    ids = torch.randint(2, config.vocab_size, (1, 47))  # 12 blocks, the last one padded; sparse above 20
    with torch.no_grad():
        logits = model(ids).logits
        for t in (0, 3, 9, 22, 35, 40, 45):
            changed = ids.clone()
            changed[0, t + 1 :] = torch.randint(2, config.vocab_size, (ids.shape[1] - t - 1,))
            torch.testing.assert_close(model(changed).logits[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(model(changed).logits[:, t + 1 :], logits[:, t + 1 :])


def test_hugging_face_causal_lm_is_not_strictly_causal():
    """The contrast: HF's BigBirdForCausalLM keeps block-sparse attention (global last block, random blocks
    from anywhere), so changing later tokens moves earlier logits."""
    from transformers import BigBirdConfig, BigBirdForCausalLM

    config = BigBirdConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        block_size=4, num_random_blocks=1, attention_type="block_sparse", is_decoder=True,
        max_position_embeddings=128, sep_token_id=2,
    )
    model = BigBirdForCausalLM(config).eval()
    ids = torch.randint(5, 50, (1, 48))
    changed = ids.clone()
    changed[0, 30:] = torch.randint(5, 50, (18,))
    with torch.no_grad():
        assert model.config.attention_type == "block_sparse"
        assert not torch.allclose(model(ids).logits[:, :30], model(changed).logits[:, :30], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 4. memory grows linearly
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_memory_is_linear_at_16k_tokens(causal):
    """Forward + backward of one mixer (d = 32, 2 heads, b = 64, r = 3, float32) at n = 8192 and 16384 tokens;
    each query sees at most w = (5 + r) b = 512 keys. The main buffers: the gathered keys and values and their
    gradients, 4 * H * n * (w / b) * Dh floats = 2 n w bytes; the float mask of the middle blocks, 4 n w bytes
    (causal: one row per query, shared by heads, built here since the cache is cleared); SDPA's buffers.
    The true peak is about 10 n w bytes (80 MB at 16k), but `memory_probe.peak_memory_bytes` adds up the
    allocation events of nested operators (an `aten::empty` inside `aten::zeros` inside a backward node counts
    at every level), which inflates it about 7x (~66 n w), hence the bound 96 n w bytes (805 MB; a dense
    float32 score matrix alone would be 4 H n^2 = 2 GiB). Linearity itself: doubling n at most doubles the
    peak (+10%). The largest single tensor (the gathered keys, H n w Dh / b floats) stays below n^2 / 8 bytes."""
    b, r = 64, 3
    window = (5 + r) * b
    peaks = {}
    for n_tokens in (8192, 16384):
        config = _config(block_size=b, num_random_blocks=r, max_position_embeddings=16384)
        mixer = BlockSparseAttention(config, 0)
        hidden = torch.randn(1, n_tokens, D, requires_grad=True)
        inputs = MixerInputs(None, None, causal=causal)

        def step(mixer=mixer, hidden=hidden, inputs=inputs):
            mixer(hidden, inputs).sum().backward()

        step()  # draws the random plan, as the first training step would
        bs._MASK_CACHE.clear()
        peaks[n_tokens] = peak_memory_bytes(step)
        assert peaks[n_tokens] < 96 * n_tokens * window, peaks
    largest, op = largest_tensor_bytes(step)
    assert peaks[16384] < 2.2 * peaks[8192], peaks
    assert largest < 16384**2 / 8, (largest, op)


# --------------------------------------------------------------------------------------------------
# 5. parity with Hugging Face BigBirdBlockSparseAttention
# --------------------------------------------------------------------------------------------------
def _hf_pair(r: int, b: int, seed: int = 3):
    """HF's module (use_bias=False, so no biases to zero) and ours with its q/k/v weights and an identity
    o_proj (HF's block-sparse module returns the context before its output dense layer)."""
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import (
        BigBirdBlockSparseAttention,
    )

    hf_config = BigBirdConfig(
        hidden_size=D, num_attention_heads=H, block_size=b, num_random_blocks=r, attention_type="block_sparse",
        use_bias=False, max_position_embeddings=512,
    )
    hf = BigBirdBlockSparseAttention(hf_config, seed=seed).double()
    ours = _mixer(block_size=b, num_random_blocks=r, position_embedding_type="none", is_decoder=False)
    with torch.no_grad():
        ours.q_proj.weight.copy_(hf.query.weight)
        ours.kv_proj.weight.copy_(torch.cat([hf.key.weight, hf.value.weight]))
        ours.o_proj.weight.copy_(torch.eye(D))
    return hf, ours


def _hf_masks(attention_mask: torch.Tensor, b: int):
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel

    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(attention_mask.double(), b)
    return {
        "band_mask": band, "from_mask": from_mask, "to_mask": to_mask,
        "from_blocked_mask": blocked, "to_blocked_mask": blocked,
    }


def _record_plans(hf) -> list:
    recorded = []
    draw = hf._bigbird_block_rand_mask_with_head

    def record(*args, **kwargs):
        recorded.append(draw(*args, **kwargs))
        return recorded[-1]

    hf._bigbird_block_rand_mask_with_head = record
    return recorded


@pytest.mark.parametrize("r,b", [(1, 4), (2, 4), (3, 2)])
def test_matches_hugging_face_bigbird(r, b):
    """HF's module in training mode (it has no dropout; training only makes it draw its random plan, numpy
    seeded with the layer index on every call): we record HF's `rand_attn` and hand ours the same plan.
    (HF cannot run with r = 0, and in eval mode it uses no plan: see the next test.)"""
    length = b * (2 * r + 7)  # past HF's full-attention threshold, and not one of its special lengths
    hf, ours = _hf_pair(r, b)
    hf.train()
    recorded = _record_plans(hf)
    hidden = torch.randn(2, length, D, dtype=torch.float64)
    attention_mask = torch.ones(2, length)
    attention_mask[1, -6:] = 0
    with torch.no_grad():
        hf_out = hf(hidden, **_hf_masks(attention_mask, b))[0]
    n = length // b
    plan = torch.full((H, n, r), -1, dtype=torch.long)
    plan[:, 1 : n - 1] = torch.as_tensor(np.stack(recorded[0]), dtype=torch.long)
    assert (plan[:, 1 : n - 1] > 0).all()  # a real plan: no slot points back at global block 0
    ours.random_plan = lambda num_blocks, causal, device="cpu": plan
    with torch.no_grad():
        out = ours(hidden, MixerInputs(None, attention_mask.bool(), causal=False))
    # HF zeroes the outputs of padding queries; compare the real tokens
    valid = attention_mask.bool()
    torch.testing.assert_close(out[valid], hf_out[valid], atol=1e-5, rtol=1e-5)


def test_hugging_face_eval_mode_has_no_random_plan():
    """Why parity runs in training mode: in eval mode HF (this version) returns an all-zero `rand_attn`, so
    every "random" block is global block 0 again and is counted 1 + r times in each softmax."""
    r, b = 2, 4
    hf, _ = _hf_pair(r, b)
    hf.eval()
    recorded = _record_plans(hf)
    length = b * (2 * r + 7)
    with torch.no_grad():
        hf(torch.randn(1, length, D, dtype=torch.float64), **_hf_masks(torch.ones(1, length), b))
    assert all((plan == 0).all() for plan in recorded[0])


# --------------------------------------------------------------------------------------------------
# 6. bad input: one clear sentence each
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"block_size": 0}, r"LongLMConfig\.block_size must be a positive integer for the block_sparse mixer, got 0\."),
        ({"block_size": -8}, r"LongLMConfig\.block_size must be a positive integer .* got -8\."),
        ({"num_random_blocks": -1}, r"LongLMConfig\.num_random_blocks must be a non-negative integer .* got -1\."),
        ({"random_blocks_seed": 1.5}, r"LongLMConfig\.random_blocks_seed must be a non-negative integer"),
        ({"mem_len": 16}, r"carries no memory, so LongLMConfig\.mem_len must be 0, got 16\."),
        (
            {"block_size": 512, "num_random_blocks": 3, "is_decoder": False},
            (r"LongLMConfig\.block_size=512 with num_random_blocks=3 cannot be honoured: bidirectional block-sparse "
            r"attention starts above \(5 \+ 2 \* num_random_blocks\) \* block_size = 5632 tokens, but "
            r"max_position_embeddings is 4096, so every segment would fall back to full attention\."),
        ),
        (
            {"block_size": 1024, "num_random_blocks": 1},
            (r"LongLMConfig\.block_size=1024 with num_random_blocks=1 cannot be honoured: causal block-sparse "
            r"attention starts above \(3 \+ num_random_blocks\) \* block_size = 4096 tokens, but "
            r"max_position_embeddings is 4096, so every segment would fall back to full attention\."),
        ),
    ],
    ids=[
        "block-size-zero", "block-size-negative", "random-negative", "seed-float", "memory", "plan-unreachable",
        "causal-plan-unreachable",
    ],
)
def test_bad_config_is_one_sentence(overrides, match):
    with pytest.raises(ValueError, match=match) as error:
        _config(**overrides)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


# --------------------------------------------------------------------------------------------------
# the FlexAttention path equals the CPU path
# --------------------------------------------------------------------------------------------------
def _paths(device: str, causal: bool, length: int, masked: bool, r: int = 2, b: int = 16):
    torch.manual_seed(1)
    dtype = torch.float64 if device == "cpu" else torch.float32
    q, k, v = (torch.randn(2, H, length, DH, dtype=dtype, device=device) for _ in range(3))
    n = -(-length // b)
    plan = bs.random_block_plan(n, r, H, causal=causal, seed=5).to(device)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, length, dtype=torch.bool, device=device)
        key_mask[0, -20:] = False
        key_mask[1, 5:40] = False
    common = {"block_size": b, "plan": plan, "causal": causal, "key_mask": key_mask, "scale": DH**-0.5}
    return (q, k, v), common


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "length,masked,b", [(256, False, 16), (250, True, 16), (200, False, 16), (1000, False, 128)],
    ids=["tiles-partial", "keymask", "tail-tile", "full-tiles"],
)
def test_flex_path_equals_cpu_path_forward_on_cpu(causal, length, masked, b):
    """FlexAttention's eager CPU kernel runs forward only (no backward on CPU in this torch), at small sizes.
    Tiles of 128 tokens: several blocks per tile, a tile reaching past the end, and (b = 128) whole tiles
    marked full, which flex then computes without the mask_mod."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    (q, k, v), common = _paths("cpu", causal, length, masked, r=1 if b == 128 else 2, b=b)
    with torch.no_grad():
        flex = flex_block_sparse_attention(q, k, v, **common)
        ref = block_sparse_attention(q, k, v, **common)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,masked", [(1024, False), (1000, True)])
def test_flex_path_equals_cpu_path_on_cuda(causal, length, masked):
    (q, k, v), common = _paths("cuda", causal, length, masked, r=3, b=64)
    grads = []
    for fn in (flex_block_sparse_attention, block_sparse_attention):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, **common)
        out.backward(torch.ones_like(out))
        grads.append((out, *(t.grad for t in leaves)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


# --------------------------------------------------------------------------------------------------
# documents: block-diagonal by document, and nothing before a start reaches a token after it
# --------------------------------------------------------------------------------------------------
def _documents(starts_per_row: list[list[int]], length: int) -> torch.Tensor:
    """`MixerInputs.documents` for the given document starts of each row (the model's `document_numbers`)."""
    starts = torch.zeros(len(starts_per_row), length, dtype=torch.bool)
    for row, starts_here in enumerate(starts_per_row):
        starts[row, starts_here] = True
    return document_numbers(starts, None)


# a start at 0; one inside a block; one on a block boundary; two (one in the last block); per row different,
# with a one-token document and a start inside global block 0
_LAYOUTS = {
    "start-at-0": [[0], [0]],
    "one-inside": [[17], [17]],
    "on-block-boundary": [[20], [20]],
    "two-inside": [[9, 42], [9, 42]],
    "per-row": [[2, 30], [22, 23, 33]],
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("length", [45, 15], ids=["sparse", "short-fallback"])
def test_documents_match_dense_reference(causal, masked, layout, length):
    """Outputs and gradients equal the dense definition with the document rule, on the sparse path (45
    tokens, 12 blocks, the last padded) and on the full-attention fallback (15 tokens)."""
    mixer = _mixer(num_random_blocks=1)
    hidden = torch.randn(2, length, D, dtype=torch.float64)
    starts = [[s for s in row if s < length] or [0] for row in _LAYOUTS[layout]]
    documents = _documents(starts, length)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[0, -5:] = False
        key_mask[1, 3:9] = False
    inputs = MixerInputs(None, key_mask, causal=causal, documents=documents)
    out, grads = _grads(mixer, hidden, lambda m, x: m(x, inputs))
    ref, ref_grads = _grads(mixer, hidden, lambda m, x: dense_block_sparse(m, x, causal, key_mask, documents))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_document_reference_cuts_the_pattern():
    """The reference itself: with a start at 17 no query from 17 on sees a key before it (block 0, the global
    block, included), and the queries before it see exactly the pattern without documents."""
    mixer = _mixer(num_random_blocks=1)
    plan = mixer.random_plan(12, False)
    plain = _allowed(45, 4, 1, plan, False, None)
    cut = _allowed(45, 4, 1, plan, False, None, _documents([[17]], 45))
    assert not cut[..., 17:, :17].any() and not cut[..., :17, 17:].any()
    assert torch.equal(cut[..., :17, :17], plain[..., :17, :17]) and plain[..., 17:, :17].any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("length", [45, 15], ids=["sparse", "short-fallback"])
def test_tokens_before_a_start_change_nothing_after_it(causal, masked, length):
    """Two rows with a start at different positions: replacing every hidden state before the start leaves
    the outputs at and after it bit for bit equal (and, bidirectional, the other way round)."""
    mixer = _mixer(num_random_blocks=2)
    starts = [7, 10] if length == 15 else [13, 26]
    documents = _documents([[starts[0]], [starts[1]]], length)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[0, :2] = False
        key_mask[1, -3:] = False
    inputs = MixerInputs(None, key_mask, causal=causal, documents=documents)
    hidden = torch.randn(2, length, D, dtype=torch.float64)
    before = torch.arange(length)[None, :] < torch.tensor(starts)[:, None]  # (B, L)
    changed = torch.where(before[..., None], torch.randn_like(hidden) * 5, hidden)
    with torch.no_grad():
        out, out_changed = mixer(hidden, inputs), mixer(changed, inputs)
        assert torch.equal(out[~before], out_changed[~before])
        assert not torch.allclose(out[before], out_changed[before])
        if not causal:
            later = torch.where(before[..., None], hidden, torch.randn_like(hidden) * 5)
            assert torch.equal(out[before], mixer(later, inputs)[before])


def test_documents_none_and_one_document_agree():
    """`documents` numbering one document (a start at 0) gives the outputs of documents=None."""
    mixer = _mixer(num_random_blocks=1)
    hidden = torch.randn(2, 45, D, dtype=torch.float64)
    with torch.no_grad():
        for causal in (True, False):
            plain = mixer(hidden, MixerInputs(None, None, causal=causal))
            one = mixer(hidden, MixerInputs(None, None, causal=causal, documents=_documents([[0], [0]], 45)))
            torch.testing.assert_close(one, plain, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "length,masked,b,starts",
    [(250, True, 16, [[40, 129], [100]]), (1000, False, 128, [[384, 500], [640]])],
    ids=["tiles-partial-keymask", "full-tiles-start-on-a-tile"],
)
def test_flex_path_with_documents_equals_cpu_path_on_cpu(causal, length, masked, b, starts):
    """The flex mask_mod and its tile bookkeeping (tiles spanning a start are never full; tiles of disjoint
    documents are skipped) against the CPU path, forward only; and nothing before a start moves the flex
    outputs after it."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    (q, k, v), common = _paths("cpu", causal, length, masked, r=1 if b == 128 else 2, b=b)
    common["documents"] = _documents(starts, length)
    with torch.no_grad():
        flex = flex_block_sparse_attention(q, k, v, **common)
        torch.testing.assert_close(flex, block_sparse_attention(q, k, v, **common), atol=1e-5, rtol=1e-5)
        first = torch.tensor([row[0] for row in starts])
        before = (torch.arange(length)[None, :] < first[:, None])[:, None, :, None]  # (B, 1, L, 1)
        k2, v2 = (torch.where(before, torch.randn_like(t), t) for t in (k, v))
        again = flex_block_sparse_attention(q, k2, v2, **common)
    after = ~before[:, 0, :, 0]
    assert torch.equal(flex.transpose(1, 2)[after], again.transpose(1, 2)[after])


def _tile_pairs(count: torch.Tensor, indices: torch.Tensor, tiles: int) -> torch.Tensor:
    """A BlockMask's (count, indices) as a dense (B, H, T, T) bool of the tile pairs it lists."""
    listed = torch.arange(tiles)[None, None, None, :] < count[..., None].long()
    columns = torch.where(listed, indices.long(), tiles)
    dense = torch.zeros(*count.shape, tiles + 1, dtype=torch.bool)
    return dense.scatter_(3, columns, True)[..., :tiles]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "length,masked,b,starts",
    [
        (250, True, 16, [[40, 129], [100]]), (250, False, 16, None),
        (1000, False, 128, [[384, 500], [640]]), (1000, True, 128, None),
    ],
    ids=["tiles-partial-documents", "tiles-partial", "full-tiles-documents", "full-tiles-keymask"],
)
def test_flex_tiles_agree_with_the_mask_mod(causal, length, masked, b, starts):
    """Eager CPU flex applies the mask_mod to every pair and ignores which tiles the BlockMask lists, so the
    tile bookkeeping (used on CUDA) is checked here: a full tile holds only allowed pairs, a tile left out
    holds none, so "full, or partial and mask_mod" is exactly the mask_mod everywhere."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    _, common = _paths("cpu", causal, length, masked, r=1 if b == 128 else 2, b=b)
    documents = None if starts is None else _documents(starts, length)
    block_mask = bs.sparse_block_mask(
        2, H, length, block_size=b, plan=common["plan"], causal=causal, key_mask=common["key_mask"],
        documents=documents,
    )
    padded = -(-length // b) * b
    tiles = -(-padded // bs.FLEX_TILE)
    partial = _tile_pairs(block_mask.kv_num_blocks, block_mask.kv_indices, tiles)
    full = _tile_pairs(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, tiles)
    assert not (partial & full).any() and (full.any() or b < bs.FLEX_TILE)  # whole-block tiles can be full
    tile = torch.arange(padded) // bs.FLEX_TILE
    pos = torch.arange(padded)
    wanted = block_mask.mask_mod(
        torch.arange(2)[:, None, None, None], torch.arange(H)[None, :, None, None], pos[:, None], pos[None, :]
    ).expand(2, H, padded, padded)
    got = full[:, :, tile][..., tile] | (partial[:, :, tile][..., tile] & wanted)
    assert torch.equal(got, wanted)
    if documents is not None:  # and tiles of disjoint documents are skipped, not resolved pair by pair
        docs = bs._pad_documents(documents, tiles * bs.FLEX_TILE).view(2, tiles, bs.FLEX_TILE)
        disjoint = docs[:, :, -1, None] < docs[:, None, :, 0]
        assert not (partial & (disjoint | disjoint.transpose(1, 2))[:, None]).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_path_with_documents_equals_cpu_path_on_cuda(causal):
    """Compiled flex, where the tile bookkeeping is used: outputs and gradients equal the CPU path with two
    documents per row (one start on a tile boundary), and nothing before a start moves what follows it."""
    (q, k, v), common = _paths("cuda", causal, 1000, True, r=3, b=64)
    common["documents"] = _documents([[256, 700], [333]], 1000).cuda()
    results = []
    for fn in (flex_block_sparse_attention, block_sparse_attention):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, **common)
        out.backward(torch.ones_like(out))
        results.append((out, *(t.grad for t in leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    before = (torch.arange(1000, device="cuda")[None, :] < torch.tensor([256, 333], device="cuda")[:, None])
    k2, v2 = (torch.where(before[:, None, :, None], torch.randn_like(t), t) for t in (k, v))
    with torch.no_grad():
        again = flex_block_sparse_attention(q, k2, v2, **common)
    after = ~before
    assert torch.equal(results[0][0].detach().transpose(1, 2)[after], again.transpose(1, 2)[after])
