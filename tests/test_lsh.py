"""`lsh` (Reformer) against dense references written here from the pattern's definition (float64).

The references never sort or chunk tensors: they walk the definition token by token in Python and count,
for every (query, key) pair, how many times the key is in the query's window over all hashing rounds
(Hugging Face combines the rounds by logsumexp weights, which is one softmax in which a key counts once
per round in which it is visible). Then softmax(score + log count) @ v over the full (L, L) matrix.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from longlm import LongLMConfig, LongLMForCausalLM
from longlm.attention import lsh
from longlm.attention.base import MixerInputs
from longlm.attention.documents import document_numbers, same_document
from longlm.attention.lsh import LSHAttention
from longlm.layers.positions import apply_rotary, rotary_cos_sin
from tests.memory_probe import largest_tensor_bytes, peak_memory_bytes

D, H = 32, 4
DH = D // H
SELF_SCORE = -1e5  # HF's score of a token for itself (float32/float64)


def _config(**overrides) -> LongLMConfig:
    fields = {
        "hidden_size": D, "num_attention_heads": H, "num_hidden_layers": 2, "intermediate_size": 64,
        "hidden_dropout_prob": 0.0, "num_buckets": 4, "num_hashes": 1, "lsh_chunk_length": 4,
        "position_embedding_type": "none",
    }
    return LongLMConfig.from_preset("reformer", **{**fields, **overrides})


def _mixer(**overrides) -> LSHAttention:
    mixer = LSHAttention(_config(**overrides), 0).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.3)
    return mixer


# --------------------------------------------------------------------------------------------------
# dense references
# --------------------------------------------------------------------------------------------------
def _vectors(mixer: LSHAttention, hidden):
    """Shared query/key vectors x (rotated if rotary), normalised keys and values, all (B, H, L, Dh)."""
    batch, length, _ = hidden.shape
    x = (hidden @ mixer.qk_proj.weight.T).view(batch, length, H, DH).transpose(1, 2)
    v = (hidden @ mixer.v_proj.weight.T).view(batch, length, H, DH).transpose(1, 2)
    if mixer.config.position_embedding_type == "rotary":
        cos, sin = rotary_cos_sin(torch.arange(length), DH, mixer.config.rope_theta)
        x = apply_rotary(x, cos, sin)
    keys = x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + 1e-6) / math.sqrt(DH)
    return x, keys, v


def _buckets(mixer: LSHAttention, x) -> list:
    """buckets[b][h][r][i] = argmax over [x_i R ; -x_i R] with R = the mixer's rotation of head h, round r."""
    config = mixer.config
    batch, _, length, _ = x.shape
    if config.num_buckets == 1:
        return torch.zeros(batch, H, config.num_hashes, length, dtype=torch.long).tolist()
    out = []
    for r in range(config.num_hashes):
        rotated = torch.einsum("bhld,hdk->bhlk", x.detach(), mixer.rotations[:, :, r, :].to(x.dtype))
        out.append(torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1))
    return torch.stack(out, dim=2).tolist()


def _bidirectional_counts(buckets, valid, c: int, documents) -> torch.Tensor:
    """Per round: tokens sorted by (document, bucket, position), invalid and filler tokens in an extra last
    bucket, length padded to a multiple of c; rounds concatenated; chunks of c; each chunk sees itself and the
    previous chunk (cyclically). counts[b, h, i, j] = times key j is in a window of query i (the document
    rule itself is applied by `dense_lsh`)."""
    batch, heads, rounds, length = len(buckets), len(buckets[0]), len(buckets[0][0]), len(buckets[0][0][0])
    padded = -(-length // c) * c
    counts = torch.zeros(batch, heads, length, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            sequence = []
            for r in range(rounds):
                group = [
                    (documents[b][i], buckets[b][h][r][i]) if i < length and valid[b][i] else (math.inf, 0)
                    for i in range(padded)
                ]
                sequence += sorted(range(padded), key=lambda i: (group[i], i))
            chunks = [sequence[s : s + c] for s in range(0, len(sequence), c)]
            for index, chunk in enumerate(chunks):
                window = chunks[index - 1] + chunk  # index - 1 = -1 wraps to the last chunk
                for i in chunk:
                    for j in window:
                        if i < length and j < length and (j == i or valid[b][j]):
                            counts[b, h, i, j] += 1
    return counts


def _causal_counts(buckets, valid, c: int, documents) -> torch.Tensor:
    """Per round: the rank of a valid token is the number of earlier valid tokens in its bucket *of its own
    document*; query i (valid) sees the earlier valid keys j of that bucket with rank_j >= c * floor(rank_i / c)
    - c. Every query sees itself once per round."""
    batch, heads, rounds, length = len(buckets), len(buckets[0]), len(buckets[0][0]), len(buckets[0][0][0])
    counts = torch.zeros(batch, heads, length, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for r in range(rounds):
                bucket = [(documents[b][t], buckets[b][h][r][t]) for t in range(length)]
                rank, seen = {}, defaultdict(int)
                for t in range(length):
                    if valid[b][t]:
                        rank[t] = seen[bucket[t]]
                        seen[bucket[t]] += 1
                for i in range(length):
                    counts[b, h, i, i] += 1
                    if not valid[b][i]:
                        continue
                    lowest = c * (rank[i] // c) - c
                    for j in range(i):
                        if valid[b][j] and bucket[j] == bucket[i] and rank[j] >= lowest:
                            counts[b, h, i, j] += 1
    return counts


def _attend(mixer: LSHAttention, x, keys, v, counts):
    """softmax(score + log count) @ v with a token's score for itself replaced by -1e5, then o_proj."""
    batch, _, length, _ = x.shape
    scores = x @ keys.transpose(-1, -2)
    scores = torch.where(torch.eye(length, dtype=torch.bool), torch.full_like(scores, SELF_SCORE), scores)
    probs = torch.softmax(scores + counts.log(), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, D)
    return out @ mixer.o_proj.weight.T


def dense_lsh(mixer: LSHAttention, hidden, causal: bool, key_mask=None, return_counts: bool = False, documents=None):
    """The dense reference; `documents` (B, L): each document's pattern is the one it has alone (ranks and
    sort per document) and a query sees only the keys of its document (mask &= same_document)."""
    config = mixer.config
    x, keys, v = _vectors(mixer, hidden)
    valid = (torch.ones(hidden.shape[:2], dtype=torch.bool) if key_mask is None else key_mask).tolist()
    numbers = torch.zeros(hidden.shape[:2], dtype=torch.long) if documents is None else documents
    buckets = _buckets(mixer, x)
    if causal:
        counts = _causal_counts(buckets, valid, config.lsh_chunk_length, numbers.tolist())
    else:
        counts = _bidirectional_counts(buckets, valid, config.lsh_chunk_length, numbers.tolist())
    counts = counts * same_document(numbers, numbers)[:, None]
    out = _attend(mixer, x, keys, v, counts)
    return (out, counts) if return_counts else out


def dense_full_with_self_rule(mixer: LSHAttention, hidden, causal: bool, key_mask=None):
    """Full shared-QK attention: every (earlier, if causal) valid key once, self only at -1e5."""
    x, keys, v = _vectors(mixer, hidden)
    length = hidden.shape[1]
    allowed = torch.ones(hidden.shape[0], 1, length, length, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool)
    return _attend(mixer, x, keys, v, allowed.double().expand(-1, H, -1, -1))


def _check(mixer, reference, hidden, causal, key_mask=None, tol=1e-8, documents=None):
    """Outputs and gradients (input and every parameter) of the mixer against `reference`."""
    out = mixer(hidden, MixerInputs(None, key_mask, causal, documents=documents))
    ref = reference(mixer, hidden, causal, key_mask) if documents is None else reference(
        mixer, hidden, causal, key_mask, documents=documents
    )
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    weight = torch.randn_like(out)
    wrt = [hidden, *mixer.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), wrt)
    ref_grads = torch.autograd.grad((ref * weight).sum(), wrt)
    for name, g, rg in zip(["hidden"] + [n for n, _ in mixer.named_parameters()], grads, ref_grads):
        assert g.abs().sum() > 0, f"zero gradient for {name}"
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# 1. equals the dense reference (both modes, 1 and 2 rounds, lengths on and off the chunk grid)
# --------------------------------------------------------------------------------------------------
CASES = [  # (length, chunk, buckets, rounds, positions, padding)
    (16, 4, 4, 1, "none", False),  # a multiple of the chunk
    (19, 4, 4, 2, "none", False),  # not a multiple, two rounds
    (13, 4, 2, 2, "rotary", True),  # rotary (hashing sees the rotated vectors), padding keys
    (22, 8, 8, 3, "rotary", False),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "autograd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"L{case[0]}-c{case[1]}-nb{case[2]}-r{case[3]}-{case[4]}-pad{case[5]}")
def test_matches_dense_reference(case, causal, fused):
    length, c, buckets, rounds, positions, padding = case
    mixer = _mixer(lsh_chunk_length=c, num_buckets=buckets, num_hashes=rounds, position_embedding_type=positions)
    mixer.config._attn_implementation = "sdpa" if fused else "eager"
    hidden = torch.randn(2, length, D, dtype=torch.float64, requires_grad=True)
    key_mask = None
    if padding:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[0, :3] = False  # left padding
        key_mask[1, -4:] = False  # right padding
    _check(mixer, dense_lsh, hidden, causal, key_mask)
    # the pattern is really sparse, and with several rounds some keys really count more than once
    _, counts = dense_lsh(mixer, hidden.detach(), causal, key_mask, return_counts=True)
    full = torch.ones(length, length).tril() if causal else torch.ones(length, length)
    assert ((counts == 0) & (full > 0)).any()
    if rounds > 1:
        assert (counts.masked_fill(torch.eye(length, dtype=torch.bool), 0) > 1).any()


def test_hashing_sees_the_rotated_vectors():
    """With rotary positions, the same vector at two positions can land in different buckets."""
    mixer = _mixer(position_embedding_type="rotary", num_buckets=8)
    hidden = torch.randn(1, 1, D, dtype=torch.float64).expand(1, 32, D)
    x, _, _ = _vectors(mixer, hidden)
    assert len({tuple(b) for b in mixer.hash(x)[0, :, 0].T.tolist()}) > 1
    plain = _mixer(position_embedding_type="none", num_buckets=8)
    x, _, _ = _vectors(plain, hidden)
    assert len({tuple(b) for b in plain.hash(x)[0, :, 0].T.tolist()}) == 1


@pytest.mark.parametrize("causal", [True, False])
def test_padding_tokens_change_nothing_else(causal):
    """Padding keys go to their own bucket: they take no rank or chunk slot of a real token, so their
    content cannot change the other outputs (without rotary, positions do not matter either)."""
    mixer = _mixer(num_buckets=4, num_hashes=2, lsh_chunk_length=4)
    hidden = torch.randn(1, 18, D, dtype=torch.float64)
    key_mask = torch.ones(1, 18, dtype=torch.bool)
    key_mask[0, [2, 7, 8, 15]] = False
    other = hidden.clone()
    other[0, [2, 7, 8, 15]] = torch.randn(4, D, dtype=torch.float64)
    with torch.no_grad():
        a = mixer(hidden, MixerInputs(None, key_mask, causal))
        b = mixer(other, MixerInputs(None, key_mask, causal))
        dropped = mixer(hidden[:, key_mask[0]], MixerInputs(None, None, causal))
    torch.testing.assert_close(a[:, key_mask[0]], b[:, key_mask[0]], rtol=1e-12, atol=1e-12)
    if causal:  # the bidirectional chunk grid depends on the padded length, the causal pattern does not
        torch.testing.assert_close(a[:, key_mask[0]], dropped, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# 1b. documents: block-diagonal by document, each document's pattern as if it were alone
# --------------------------------------------------------------------------------------------------
LAYOUTS = {  # per row, the positions where a document starts
    "start-at-0": ([0], [0, 9]),
    "one-inside": ([7], [11]),
    "two-inside": ([5, 12], [3, 10]),
    "per-row-different": ([], [6, 8]),
}


def _documents(length: int, layout) -> torch.Tensor:
    """(B, L) document numbers as the model builds them (`document_numbers` of the start marks)."""
    starts = torch.zeros(len(layout), length, dtype=torch.bool)
    for row, positions in enumerate(layout):
        starts[row, positions] = True
    return document_numbers(starts, None)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=str)
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "autograd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"L{case[0]}-c{case[1]}-nb{case[2]}-r{case[3]}-{case[4]}")
def test_documents_match_dense_reference(case, causal, fused, padding, layout):
    length, c, buckets, rounds, positions, _ = case
    mixer = _mixer(lsh_chunk_length=c, num_buckets=buckets, num_hashes=rounds, position_embedding_type=positions)
    mixer.config._attn_implementation = "sdpa" if fused else "eager"
    hidden = torch.randn(2, length, D, dtype=torch.float64, requires_grad=True)
    documents = _documents(length, LAYOUTS[layout])
    key_mask = None
    if padding:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[0, :2] = False  # left padding
        key_mask[1, -3:] = False  # right padding
    _check(mixer, dense_lsh, hidden, causal, key_mask, documents=documents)
    # without the rule some query would see a key of another document: the rule is really exercised
    _, counts = dense_lsh(mixer, hidden.detach(), causal, key_mask, return_counts=True)
    assert (counts * ~same_document(documents, documents)[:, None]).sum() > 0


def _row_changed(hidden: torch.Tensor, row_slices) -> torch.Tensor:
    """A copy of `hidden` with new random states at `row_slices[b]` of each row b."""
    other = hidden.clone()
    for row, part in enumerate(row_slices):
        other[row, part] = torch.randn_like(other[row, part])
    return other


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "autograd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_outputs_after_a_start_ignore_everything_before_it(causal, fused, dtype, padding):
    """Row 0 starts a document at 9, row 1 at 16: new states at every position before the start leave the
    outputs at and after it bit-identical (the layout counts only the earlier tokens' number), and new
    states from the start on leave the earlier outputs bit-identical; without `documents` they do change."""
    length, starts = 29, (9, 16)
    mixer = _mixer(num_buckets=4, num_hashes=2, lsh_chunk_length=4, position_embedding_type="rotary").to(dtype)
    mixer.config._attn_implementation = "sdpa" if fused else "eager"
    hidden = torch.randn(2, length, D, dtype=dtype)
    documents = _documents(length, ([starts[0]], [starts[1]]))
    key_mask = None
    if padding:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[0, -5:] = False  # right padding, after the start
        key_mask[1, :3] = False  # left padding, before the start
    before = _row_changed(hidden, [slice(0, start) for start in starts])
    after = _row_changed(hidden, [slice(start, None) for start in starts])

    def run(states, docs=documents):
        return mixer(states, MixerInputs(None, key_mask, causal, documents=docs))

    with torch.no_grad():
        out, out_before, out_after = run(hidden), run(before), run(after)
        plain, plain_before = run(hidden, None), run(before, None)
    for row, start in enumerate(starts):
        assert torch.equal(out_before[row, start:], out[row, start:])
        assert torch.equal(out_after[row, :start], out[row, :start])
        assert not torch.allclose(plain_before[row, start:], plain[row, start:])


def test_decoder_with_document_starts_ignores_the_earlier_document():
    """The whole reformer decoder (two reversible lsh layers): with `document_starts`, new tokens before the
    start of each row leave every logit at and after it exactly equal."""
    model = _model(seed=4)
    ids = torch.randint(2, 50, (2, 27))
    starts = torch.zeros(2, 27, dtype=torch.bool)
    starts[0, 8], starts[1, 15] = True, True
    changed = ids.clone()
    changed[0, :8] = torch.randint(2, 50, (8,))
    changed[1, :15] = torch.randint(2, 50, (15,))
    with torch.no_grad():
        logits = model(ids, document_starts=starts).logits
        other = model(changed, document_starts=starts).logits
    assert torch.equal(other[0, 8:], logits[0, 8:]) and torch.equal(other[1, 15:], logits[1, 15:])
    assert not torch.allclose(other[0, :8], logits[0, :8])


# --------------------------------------------------------------------------------------------------
# 2. full coverage equals full attention (with the Reformer's self rule)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "causal,buckets,rounds",
    [(False, 1, 1), (False, 4, 2), (True, 1, 1), (True, 1, 2)],
)
def test_full_coverage_equals_full_attention(causal, buckets, rounds):
    """One bucket (`num_buckets=1`: no hashing) and a chunk >= the length: every query sees every (earlier)
    key, so LSH attention is full shared-QK attention. Bidirectionally a chunk >= the length is enough for
    any number of buckets (one chunk per round, and the previous chunk is a copy of the same tokens, so every
    key counts equally). The comparison is with full attention *with the self rule* (a token attends to
    itself only when nothing else is visible), not with the `full` mixer: Reformer shares one projection
    for queries and keys and normalises the keys, and a token never picks itself over other keys, none of
    which a separate-q/k softmax attention with the same weights can express."""
    length = 11
    mixer = _mixer(num_buckets=buckets, num_hashes=rounds, lsh_chunk_length=16)
    hidden = torch.randn(2, length, D, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, :2] = False
    _check(mixer, dense_full_with_self_rule, hidden, causal, key_mask)
    # the first token of a causal sequence has nothing else to see: it attends to itself
    with torch.no_grad():
        out = mixer(hidden, MixerInputs(None, None, causal))
        _, _, v = _vectors(mixer, hidden)
    if causal:
        first = v[:, :, 0].reshape(2, D) @ mixer.o_proj.weight.T
        torch.testing.assert_close(out[:, 0], first, rtol=1e-10, atol=1e-10)


def test_one_bucket_short_chunks_is_local_attention():
    """num_buckets=1 with short chunks is not full coverage: the sort keeps positions, so a query sees
    its chunk and the previous one (here the bidirectional reference and a positional check agree)."""
    mixer = _mixer(num_buckets=1, lsh_chunk_length=4)
    assert mixer.rotations.shape == (H, DH, 1, 0)
    hidden = torch.randn(1, 16, D, dtype=torch.float64, requires_grad=True)
    _check(mixer, dense_lsh, hidden, False)
    _, counts = dense_lsh(mixer, hidden.detach(), False, return_counts=True)
    query_chunk = torch.arange(16)[:, None] // 4
    key_chunk = torch.arange(16)[None, :] // 4
    expected = (key_chunk == query_chunk) | (key_chunk == (query_chunk - 1) % 4)
    assert torch.equal(counts[0, 0] > 0, expected)


# --------------------------------------------------------------------------------------------------
# 3. strict causality of the decoder, and token-by-token decoding
# --------------------------------------------------------------------------------------------------
def _model(seed: int = 0) -> LongLMForCausalLM:
    torch.manual_seed(seed)
    config = LongLMConfig.from_preset(
        "reformer", hidden_size=D, num_attention_heads=H, num_hidden_layers=2, intermediate_size=64,
        hidden_dropout_prob=0.0, num_buckets=4, num_hashes=2, lsh_chunk_length=4, vocab_size=50,
    )
    return LongLMForCausalLM(config).double().eval()


def test_decoder_is_strictly_causal():
    """Changing any token after t leaves the logits up to t unchanged, although later tokens change
    buckets (the sorted order of the whole sequence, which HF's causal LSH chunks, changes with them)."""
    model = _model()
    ids = torch.randint(2, 50, (2, 29))
    with torch.no_grad():
        logits = model(ids).logits
        for t in (0, 3, 4, 10, 17, 27):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(2, 50, (2, ids.shape[1] - t - 1))
            other = model(changed).logits
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


def test_decoding_token_by_token_reproduces_the_full_sequence():
    """Running the causal model on growing prefixes gives, at each prefix's last position, the logits of
    the full-sequence pass (fixed rotations: a token hashes the same way every time), and greedy
    `generate` continues a prompt exactly as repeated full passes do."""
    model = _model(seed=1)
    ids = torch.randint(2, 50, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        for t in range(ids.shape[1]):
            step = model(ids[:, : t + 1]).logits[:, -1]
            torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
        prompt = ids[:, :9]
        generated = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = prompt
        for _ in range(6):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


def test_rotations_are_a_saved_seeded_buffer(tmp_path):
    model = _model(seed=2)
    layers = [layer.block.mixer for layer in model.model.layers]
    assert all(name in model.state_dict() for name in ("model.layers.0.block.mixer.rotations",))
    assert not torch.equal(layers[0].rotations, layers[1].rotations)  # one seed per layer
    again = LSHAttention(model.config, 1).double()
    torch.testing.assert_close(again.rotations, layers[1].rotations, rtol=0, atol=0)
    ids = torch.randint(2, 50, (1, 17))
    model.save_pretrained(tmp_path)
    loaded = LongLMForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)


def test_reversible_recomputation_reuses_the_forward_buckets():
    """A reversible block reruns its mixer in backward on an input rebuilt from the block's outputs (equal up
    to rounding): the rerun must hash exactly as the forward did, so the forward's buckets are kept (one
    entry per pending backward) and the rerun takes them, whatever input it gets."""
    from longlm.layers.recompute import recomputing

    mixer = _mixer(num_buckets=8, num_hashes=2).train()
    assert mixer.config.reversible
    hidden, other = torch.randn(2, 1, 21, D, dtype=torch.float64)
    with torch.no_grad():
        mixer(hidden, MixerInputs(None, None, True))  # the reversible forward: training, no graph
    forward_buckets = mixer.hash(_vectors(mixer, hidden)[0])
    assert len(mixer._stash) == 1 and torch.equal(mixer._stash[0].long(), forward_buckets)
    with recomputing():
        rerun = mixer(other, MixerInputs(None, None, True))
    assert mixer._stash == []
    mixer.hash = lambda x: forward_buckets  # the expected rerun: other's vectors, hidden's buckets
    expected = mixer(other, MixerInputs(None, None, True))
    torch.testing.assert_close(rerun, expected, rtol=0, atol=0)
    assert not torch.equal(LSHAttention.hash(mixer, _vectors(mixer, other)[0]), forward_buckets)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_reversible_recomputation_with_documents_reuses_the_forward_buckets(causal):
    """With documents the stash still holds the forward's raw buckets, and the rerun applies the same
    document renumbering to them: the rerun equals a forward on the rebuilt input with the forward's buckets."""
    from longlm.layers.recompute import recomputing

    mixer = _mixer(num_buckets=8, num_hashes=2).train()
    hidden, other = torch.randn(2, 2, 21, D, dtype=torch.float64)
    inputs = MixerInputs(None, None, causal, documents=_documents(21, ([6], [0, 13])))
    with torch.no_grad():
        mixer(hidden, inputs)
    forward_buckets = mixer.hash(_vectors(mixer, hidden)[0])
    assert len(mixer._stash) == 1 and torch.equal(mixer._stash[0].long(), forward_buckets)
    with recomputing():
        rerun = mixer(other, inputs)
    assert mixer._stash == []
    mixer.hash = lambda x: forward_buckets
    torch.testing.assert_close(rerun, mixer(other, inputs), rtol=0, atol=0)
    assert not torch.allclose(rerun, mixer(other, MixerInputs(None, None, causal)))  # the rerun kept the documents


def test_reversible_model_trains_and_leaves_nothing_stashed():
    model = _model(seed=3).train()
    ids = torch.randint(2, 50, (2, 30))
    model(ids, labels=ids).loss.backward()
    assert all(layer.block.mixer._stash == [] for layer in model.model.layers)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():  # a forward that no backward follows keeps at most STASH_LIMIT entries per layer
        for _ in range(6):
            model(ids)
    assert all(len(layer.block.mixer._stash) == lsh.STASH_LIMIT for layer in model.model.layers)


def test_attention_dropout_trains():
    mixer = _mixer(attention_dropout=0.5, num_hashes=2).train()
    hidden = torch.randn(1, 13, D, dtype=torch.float64, requires_grad=True)
    out = mixer(hidden, MixerInputs(None, None, True))
    out.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    mixer.eval()
    with torch.no_grad():
        assert not torch.allclose(out, mixer(hidden, MixerInputs(None, None, True)))


# --------------------------------------------------------------------------------------------------
# 4. memory grows linearly
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_memory_is_linear_at_16k_tokens(causal):
    """Forward + backward of one mixer (d = 32, 2 heads of 16, c = 64, 64 buckets, 2 rounds, float32) at 8192 and
    16384 tokens. Each query slot scores a window of w = 3c (causal) or 2c keys per round: E = H R n w scored
    pairs. The buffers that scale with E: the additive float mask (4E bytes, the largest tensor: 48 MiB causal
    at 16k), the boolean pieces it is built from (1E bytes each), the fused kernel's key/value window
    gradients (2E Dh / c floats = 2E bytes); no score matrix is kept (the kernel recomputes it in backward).
    Measured peak: 6.4E bytes causal, 7.5E bidirectional; bound 12E (151 MB causal at 16k; one dense float32
    score matrix would be 4 H n^2 = 2 GiB). Doubling n at most doubles the peak (+10%), and the largest tensor
    stays below 1/16 of one float32 n x n matrix."""
    c, heads, rounds = 64, 2, 2
    window = (3 if causal else 2) * c
    peaks = {}
    for n_tokens in (8192, 16384):
        config = _config(
            hidden_size=32, num_attention_heads=heads, num_buckets=64, num_hashes=rounds, lsh_chunk_length=c,
            max_position_embeddings=16384,
        )
        mixer = LSHAttention(config, 0)
        hidden = torch.randn(1, n_tokens, 32, requires_grad=True)
        inputs = MixerInputs(None, None, causal=causal)

        def step(mixer=mixer, hidden=hidden, inputs=inputs):
            mixer(hidden, inputs).sum().backward()

        step()
        peaks[n_tokens] = peak_memory_bytes(step)
        assert peaks[n_tokens] < 12 * heads * rounds * n_tokens * window, peaks
    largest, op = largest_tensor_bytes(step)
    assert peaks[16384] < 2.2 * peaks[8192], peaks
    assert largest < 4 * 16384**2 / 16, (largest, op)


# --------------------------------------------------------------------------------------------------
# 5. parity with Hugging Face's LSHSelfAttention (bidirectional)
# --------------------------------------------------------------------------------------------------
def _hf_pair(buckets: int, rounds: int, c: int, dtype, hash_seed: int = 7):
    """HF's module and ours with its query_key/value weights, a random o_proj applied to HF's output (HF's
    module returns the context before its output dense layer), and HF's rotations: HF seeds the global
    generator with hash_seed and draws randn(heads, head_dim, rounds, buckets / 2) in the input dtype on
    every call, so drawing the same here gives the very tensor it uses."""
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    hf_config = ReformerConfig(
        attn_layers=["lsh"], hidden_size=D, num_attention_heads=H, attention_head_size=DH, num_buckets=buckets,
        num_hashes=rounds, lsh_attn_chunk_length=c, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
        is_decoder=False, hash_seed=hash_seed, lsh_attention_probs_dropout_prob=0.0,
    )
    hf = LSHSelfAttention(hf_config, layer_idx=0).to(dtype).eval()
    ours = LSHAttention(_config(num_buckets=buckets, num_hashes=rounds, lsh_chunk_length=c, is_decoder=False), 0)
    ours = ours.to(dtype).eval()
    with torch.no_grad():
        ours.qk_proj.weight.copy_(hf.query_key.weight)
        ours.v_proj.weight.copy_(hf.value.weight)
        torch.manual_seed(hash_seed)
        ours.rotations.copy_(torch.randn((H, DH, rounds, buckets // 2), dtype=dtype))
    return hf, ours


@pytest.mark.parametrize(
    "buckets,rounds,c,length,padding,dtype",
    [
        (4, 1, 4, 16, 0, torch.float64),
        (4, 2, 4, 24, 0, torch.float64),
        (8, 3, 8, 32, 5, torch.float64),  # padding: HF's extra bucket for masked tokens, as ours
        (2, 2, 4, 20, 3, torch.float64),
        (8, 2, 8, 64, 0, torch.float32),
    ],
)
def test_matches_huggingface_lsh_self_attention(buckets, rounds, c, length, padding, dtype):
    hf, ours = _hf_pair(buckets, rounds, c, dtype)
    hidden = torch.randn(2, length, D, dtype=dtype)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    if padding:
        attention_mask[1, -padding:] = 0
    with torch.no_grad():
        expected = hf(hidden, attention_mask=attention_mask if padding else None).hidden_states
        expected = expected @ ours.o_proj.weight.T
        got = ours(hidden, MixerInputs(None, attention_mask.bool() if padding else None, causal=False))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 6. bad input: one clear sentence each
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_buckets": 3}, r"num_buckets must be 1 \(no hashing\) or a positive even number, got 3\."),
        ({"num_buckets": 0}, r"num_buckets must be 1 \(no hashing\) or a positive even number, got 0\."),
        ({"num_buckets": -2}, r"num_buckets must be 1 \(no hashing\) or a positive even number, got -2\."),
        ({"num_hashes": 0}, r"num_hashes must be a positive integer \(hashing rounds\), got 0\."),
        ({"lsh_chunk_length": 0}, r"lsh_chunk_length must be a positive integer, got 0\."),
        ({"mem_len": 16}, r"lsh mixer attends within the segment only, so LongLMConfig\.mem_len must be 0, got 16\."),
    ],
)
def test_bad_config_is_one_clear_sentence(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_num_buckets_one_is_allowed():
    assert _config(num_buckets=1).num_buckets == 1


def test_memory_is_rejected_at_forward():
    mixer = _mixer()
    with pytest.raises(ValueError, match="cannot take memory"):
        mixer(torch.randn(1, 4, D, dtype=torch.float64), MixerInputs(torch.randn(1, 2, D, dtype=torch.float64), None, True))
