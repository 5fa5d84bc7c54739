"""The `routing` mixer (Routing Transformer) against a dense float64 reference built from the same clusters,
the `full` mixer at full coverage, strict causality, linear memory, the online k-means, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import longlm.attention.routing  # noqa: F401  (registers the mixer)
from longlm import LongLMConfig, LongLMForCausalLM
from longlm.attention.base import MixerInputs
from longlm.attention.documents import document_numbers, same_document
from longlm.attention.full import FullAttention
from longlm.attention.routing import RoutingAttention, balanced_slots, causal_slots, kmeans_step
from longlm.layers.recompute import recomputing
from tests.memory_probe import largest_tensor_bytes, peak_memory_bytes

B, D, H = 2, 64, 4
DH = D // H


def _config(tiny_config, **overrides) -> LongLMConfig:
    """A tiny config whose layer 0 is `routing` (the other layers `full`, so no other sparse mixer is needed)."""
    fields = dict(mem_len=0, routing_layers=[0], attention_window=4, num_clusters=3, num_routing_heads=2)
    return tiny_config("full", **{**fields, **overrides})


def _make(tiny_config, **overrides) -> RoutingAttention:
    """A float64 mixer in eval mode (no centroid updates between the mixer's forward and the reference)."""
    mixer = RoutingAttention(_config(tiny_config, **overrides), 0).double().eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.3)
    return mixer


# --------------------------------------------------------------------------------------------------
# dense reference, written from the module docstring's definition with explicit loops
# --------------------------------------------------------------------------------------------------
def _rotate(x, theta):
    """Explicit rotary (rotate-half layout) of x (B, L, heads, Dh) at positions 0..L-1."""
    length, dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype)[None, :, None, :], angles.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _causal_mask(unit, centroids, valid, s, docs=None):
    """(L, L) mask of one causal routing head: same cluster, j <= i, rank(i) - rank(j) <= s, valid j (or j == i).
    With `docs` (L,) a cluster is (document, centroid): ranks count only the own document's tokens."""
    length = unit.shape[0]
    cluster = (unit @ centroids.T).argmax(dim=-1).tolist()
    if docs is not None:
        cluster = [(int(docs[i]), c) for i, c in enumerate(cluster)]
    cluster = [c if valid[i] else -1 for i, c in enumerate(cluster)]
    rank = [sum(1 for j in range(i) if cluster[j] == cluster[i]) for i in range(length)]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            same = cluster[i] == cluster[j] != -1 and rank[i] - rank[j] <= s and bool(valid[j])
            allowed[i, j] = same or i == j
    return allowed


def _balanced_groups(unit, centroids, valid, docs=None):
    """Members (sorted positions) of each centroid's group: its ceil(L / C) best tokens, padding last. With
    `docs` (L,): per document d, each centroid's ceil(L_d / C) best tokens of d."""
    length, clusters = unit.shape[0], centroids.shape[0]
    scores = unit @ centroids.T - 4.0 * (~valid).to(unit.dtype)[:, None]
    docs = torch.zeros(length, dtype=torch.long) if docs is None else docs
    groups = []
    for d in docs.unique().tolist():
        positions = (docs == d).nonzero().flatten()
        size = math.ceil(len(positions) / clusters)
        for c in range(clusters):
            groups.append(sorted(positions[scores[positions, c].topk(size).indices].tolist()))
    return groups


def _group_mask(members, valid, s, length):
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for a, i in enumerate(members):
        for b, j in enumerate(members):
            allowed[i, j] = (abs(a - b) <= s and bool(valid[j])) or i == j
    return allowed


def _softmax_attend(q, k, v, allowed):
    scores = (q @ k.T) / math.sqrt(DH)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def dense_routing(mixer: RoutingAttention, hidden, causal: bool, key_mask=None, centroids=None, documents=None):
    """The module docstring's definition; `documents` (B, L) makes clusters per document and adds the rule
    "same document" to every head's mask."""
    config, routing, s = mixer.config, mixer.num_routing_heads, mixer.one_sided
    batch, length, _ = hidden.shape
    q = (hidden @ mixer.q_proj.weight.T).view(batch, length, H, DH)
    v = (hidden @ mixer.v_proj.weight.T).view(batch, length, H, DH)
    unit = q[:, :, :routing] / q[:, :, :routing].norm(dim=-1, keepdim=True)
    shared = unit * math.sqrt(DH)
    local_q = q[:, :, routing:]
    local_k = None if mixer.k_proj is None else (hidden @ mixer.k_proj.weight.T).view(batch, length, H - routing, DH)
    if config.position_embedding_type == "rotary":
        shared = _rotate(shared, config.rope_theta)
        if local_k is not None:
            local_q, local_k = _rotate(local_q, config.rope_theta), _rotate(local_k, config.rope_theta)
    valid = torch.ones(batch, length, dtype=torch.bool) if key_mask is None else key_mask
    centroids = mixer.centroids if centroids is None else centroids
    rows = []
    for b in range(batch):
        heads = []
        docs = None if documents is None else documents[b]
        same = torch.ones(length, length, dtype=torch.bool)
        if docs is not None:
            same = same_document(docs[None], docs[None])[0]
        for h in range(routing):
            qh, vh, uh = shared[b, :, h], v[b, :, h], unit[b, :, h].detach()
            if causal:
                heads.append(_softmax_attend(qh, qh, vh, _causal_mask(uh, centroids[h], valid[b], s, docs) & same))
                continue
            total, count = torch.zeros_like(vh), torch.zeros(length, 1, dtype=vh.dtype)
            for members in _balanced_groups(uh, centroids[h], valid[b], docs):
                in_group = torch.zeros(length, 1, dtype=torch.bool)
                in_group[members] = True
                out = _softmax_attend(qh, qh, vh, (_group_mask(members, valid[b], s, length) & same) | ~in_group)
                total, count = total + torch.where(in_group, out, 0.0), count + in_group.to(vh.dtype)
            heads.append(torch.where(count > 0, total / count.clamp(min=1), vh))
        for h in range(H - routing):
            i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
            band = ((i - j).abs() <= s) & (j <= i if causal else True) & valid[b][None, :]
            allowed = (band | (i == j)) & same
            heads.append(_softmax_attend(local_q[b, :, h], local_k[b, :, h], v[b, :, routing + h], allowed))
        rows.append(torch.stack(heads, dim=1))  # (L, H, Dh)
    out = torch.stack(rows).reshape(batch, length, D)
    return out @ mixer.o_proj.weight.T


def _check_outputs_and_grads(mixer, reference, hidden, causal, key_mask=None, rows=None, documents=None):
    """Outputs and gradients (w.r.t. every parameter and the input) agree; `rows` (B, L) limits the check to
    those query rows (the loss weights the others by zero)."""
    out = mixer(hidden, MixerInputs(None, key_mask, causal, documents=documents))
    ref = reference(hidden)
    keep = torch.ones(out.shape[:2], dtype=torch.bool) if rows is None else rows
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-9, atol=1e-9)
    weight = torch.randn_like(out) * keep[..., None]
    names = [n for n, _ in mixer.named_parameters()] + ["hidden"]
    wrt = [p for _, p in mixer.named_parameters()] + [hidden]
    grads = torch.autograd.grad((out * weight).sum(), wrt)
    ref_grads = torch.autograd.grad((ref * weight).sum(), wrt)
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.abs().sum() > 0, f"zero gradient for {name}"
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def _key_mask(length):
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[1, -3:] = False  # right padding
    mask[1, 4] = False  # a hole
    return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [12, 13])  # window 4: s = 2 keys each side; blocks of 2 slots
@pytest.mark.parametrize("masked", [False, True])
def test_matches_dense_reference(tiny_config, causal, length, masked):
    mixer = _make(tiny_config)
    hidden = torch.randn(B, length, D, dtype=torch.float64, requires_grad=True)
    key_mask = _key_mask(length) if masked else None
    _check_outputs_and_grads(mixer, lambda x: dense_routing(mixer, x, causal, key_mask), hidden, causal, key_mask)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_dense_reference_variants(tiny_config, causal):
    """No rotary, one routing head, a window that is not a multiple of anything, many clusters; in training
    mode, where the forward uses the centroids from before its own k-means update."""
    mixer = _make(tiny_config, position_embedding_type="none", num_routing_heads=1, attention_window=7, num_clusters=5)
    mixer.train()
    hidden = torch.randn(B, 17, D, dtype=torch.float64, requires_grad=True)
    key_mask = _key_mask(17)
    before = mixer.centroids.clone()
    reference = lambda x: dense_routing(mixer, x, causal, key_mask, centroids=before)
    _check_outputs_and_grads(mixer, reference, hidden, causal, key_mask)
    assert not torch.equal(mixer.centroids, before)


def test_the_reference_cases_exercise_the_pattern(tiny_config):
    """The clusters of the reference test above (same seed, same draws) are not degenerate: several clusters
    are used, a cluster is longer than the window, and in the balanced assignment some tokens are in no group
    and some in several."""
    mixer = _make(tiny_config)
    hidden = torch.randn(B, 13, D, dtype=torch.float64)
    q = hidden @ mixer.q_proj.weight.T
    unit = F.normalize(q.view(B, 13, H, DH)[0, :, 0], dim=-1)
    cluster_sizes = torch.bincount((unit @ mixer.centroids[0].T).argmax(-1), minlength=3)
    assert (cluster_sizes > 0).sum() >= 2 and cluster_sizes.max() > mixer.one_sided + 1
    groups = _balanced_groups(unit, mixer.centroids[0], torch.ones(13, dtype=torch.bool))
    counts = torch.bincount(torch.tensor([i for members in groups for i in members]), minlength=13)
    assert (counts == 0).any() and (counts >= 2).any()


# --------------------------------------------------------------------------------------------------
# full coverage: one cluster and a window covering the whole sequence is full attention
# --------------------------------------------------------------------------------------------------
class _RoutingProjection(nn.Module):
    """full's q_proj / kv_proj expressed with the routing mixer's weights: the routing heads' queries and
    keys are sqrt(Dh) * unit(x W_shared); the local heads' are plain projections."""

    def __init__(self, mixer: RoutingAttention, with_values: bool) -> None:
        super().__init__()
        self.mixer, self.with_values = mixer, with_values

    def forward(self, x):
        m, routing = self.mixer, self.mixer.num_routing_heads
        q = m.q_proj(x).unflatten(-1, (H, DH))
        shared = F.normalize(q[..., :routing, :], dim=-1) * math.sqrt(DH)
        if not self.with_values:
            return torch.cat([shared, q[..., routing:, :]], dim=-2).flatten(-2)
        keys = [shared] + ([] if m.k_proj is None else [m.k_proj(x).unflatten(-1, (H - routing, DH))])
        return torch.cat([torch.cat(keys, dim=-2).flatten(-2), m.v_proj(x)], dim=-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("routing_heads", [2, H])
@pytest.mark.parametrize("masked", [False, True])
def test_full_coverage_equals_full(tiny_config, causal, routing_heads, masked):
    """With padding, the rows of padding queries differ by definition (a padding token joins no cluster,
    causal, or only the groups with room left, bidirectional), so only real queries are compared."""
    length = 11
    mixer = _make(tiny_config, num_clusters=1, num_routing_heads=routing_heads, attention_window=2 * length)
    full = FullAttention(tiny_config("full", mem_len=0), 0).double()
    full.q_proj, full.kv_proj = _RoutingProjection(mixer, False), _RoutingProjection(mixer, True)
    full.o_proj = mixer.o_proj
    hidden = torch.randn(B, length, D, dtype=torch.float64, requires_grad=True)
    key_mask = _key_mask(length) if masked else None
    reference = lambda x: full(x, MixerInputs(None, key_mask, causal))
    _check_outputs_and_grads(mixer, reference, hidden, causal, key_mask, rows=key_mask)


# --------------------------------------------------------------------------------------------------
# strict causality, any length
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_mixer_is_strictly_causal(tiny_config, training):
    """Changing inputs after t changes no output up to t (also in training, where centroids move after), to
    float64 rounding (see the model test below for why not bit for bit)."""
    mixer = _make(tiny_config).train(training)
    hidden = torch.randn(B, 23, D, dtype=torch.float64)
    for t in (0, 6, 15, 21):
        changed = hidden.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :]) * 3
        with torch.no_grad():
            centroids = mixer.centroids.clone()
            a = mixer(hidden, MixerInputs(None, None, True))
            mixer.centroids.copy_(centroids)
            b = mixer(changed, MixerInputs(None, None, True))
            mixer.centroids.copy_(centroids)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_routing_preset_model_is_strictly_causal(dtype, atol):
    """Logits up to t do not depend on tokens after t. The allowed keys and their scores depend only on the
    past, but later tokens shift the slot layout (a later token of an earlier cluster moves every slot after
    it), so the fused kernel may add the same terms in another order: equality holds to rounding (1e-16 in
    float64, where any leak of information would show as O(1) differences)."""
    import longlm.attention.sliding  # noqa: F401  (the preset's other layers use the `sliding` mixer)

    config = LongLMConfig.from_preset(
        "routing",
        num_hidden_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        routing_layers=[1, 2],
        attention_window=6,
        num_clusters=3,
        num_routing_heads=2,
        hidden_dropout_prob=0.0,
    )
    model = LongLMForCausalLM(config).to(dtype).eval()
    ids = torch.randint(2, config.vocab_size, (2, 40))
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 9, 25, 38):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(2, config.vocab_size, changed[:, t + 1 :].shape)
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=atol)
            assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("causal", [True, False])
def test_any_length(tiny_config, causal):
    mixer = _make(tiny_config, num_clusters=4, attention_window=6)
    for length in (1, 2, 3, 5, 9, 31):
        hidden = torch.randn(B, length, D, dtype=torch.float64, requires_grad=True)
        key_mask = torch.ones(B, length, dtype=torch.bool)
        key_mask[1, -1] = False
        out = mixer(hidden, MixerInputs(None, key_mask, causal))
        torch.testing.assert_close(out, dense_routing(mixer, hidden, causal, key_mask), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# memory grows linearly in the sequence length
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_memory_is_linear_at_16k(tiny_config, causal):
    """Forward + backward of one mixer (d = 32, 2 heads of which 1 routes, 4 clusters, window w = 64, so
    s = 32 keys each side) at n = 8192 and n = 16384 tokens.

    Each head works on blocks of queries with a neighbourhood of span <= 1.5 w keys (bidirectional; causal
    span <= w): the boolean mask (1 byte), SDPA's additive float32 copy of it (4 bytes) and its per-block
    score buffers are O(n * span) per head, next to O(n * Dh) gathers and the (n, C) assignment scores. The
    measured peak at 16k is ~33 MiB causal and ~39 MiB bidirectional, i.e. ~35 bytes per token and window
    slot over both heads; the bound, 48 * n * w bytes (~50 MB), leaves ~25% headroom. A dense float32 score
    matrix for one head alone would be 4 n^2 = 1 GiB. Linearity itself: doubling n at most ~doubles the
    peak (quadratic memory would quadruple it), and the largest tensor stays far below n^2 elements."""
    window = 64
    config = tiny_config(
        "full", mem_len=0, hidden_size=32, num_attention_heads=2, routing_layers=[0], num_routing_heads=1,
        num_clusters=4, attention_window=window,
    )
    mixer = RoutingAttention(config, 0)
    peaks = {}
    for n in (8192, 16384):
        hidden = torch.randn(1, n, 32, requires_grad=True)

        def step(hidden=hidden):
            mixer(hidden, MixerInputs(None, None, causal)).sum().backward()

        peaks[n] = peak_memory_bytes(step)
    n = 16384
    assert peaks[n] < 48 * n * window, f"peak {peaks[n] / 2**20:.1f} MiB"
    assert peaks[n] < 2.3 * peaks[n // 2], f"peaks {peaks}"
    largest, op = largest_tensor_bytes(step)
    assert largest < 4 * n * n / 128, f"largest tensor {largest / 2**20:.1f} MiB from {op}"


# --------------------------------------------------------------------------------------------------
# online k-means
# --------------------------------------------------------------------------------------------------
def _kmeans_mixer(tiny_config, decay=0.9) -> RoutingAttention:
    """hidden 4, 2 heads of 2: the routing head's shared vector is (x_0, x_1); 3 centroids in the plane."""
    config = _config(
        tiny_config, hidden_size=4, num_attention_heads=2, num_routing_heads=1, num_clusters=3, kmeans_decay=decay,
        intermediate_size=8,
    )
    mixer = RoutingAttention(config, 0).double()
    with torch.no_grad():
        mixer.q_proj.weight.copy_(torch.eye(4, dtype=torch.float64))
        mixer.centroids.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64))
    return mixer


def _kmeans_batch():
    # unit vectors (0.8, 0.6) -> centroid 0, (0.6, 0.8) and (0, 1) -> centroid 1, nothing -> centroid 2;
    # the last token, (1, 0), is padding and must not count
    hidden = torch.tensor([[[1.6, 1.2, 0.3, -0.2], [3.0, 4.0, 0.0, 1.0], [0.0, 0.5, 2.0, 0.0], [7.0, 0.0, 0.0, 0.0]]])
    key_mask = torch.tensor([[True, True, True, False]])
    return hidden.double(), key_mask


@pytest.mark.parametrize("causal", [True, False])
def test_kmeans_ema_matches_closed_form(tiny_config, causal):
    mixer = _kmeans_mixer(tiny_config).train()
    hidden, key_mask = _kmeans_batch()
    mixer(hidden, MixerInputs(None, key_mask, causal))
    # mu_c <- normalize(0.9 mu_c + 0.1 mean of its members); members: c0 = {(.8, .6)}, c1 = {(.6, .8), (0, 1)}
    c0 = torch.tensor([0.9 + 0.1 * 0.8, 0.1 * 0.6])  # (0.98, 0.06)
    c1 = torch.tensor([0.1 * 0.3, 0.9 + 0.1 * 0.9])  # (0.03, 0.99)
    expected = torch.stack([c0 / c0.norm(), c1 / c1.norm(), torch.tensor([-1.0, 0.0])])[None].double()
    torch.testing.assert_close(mixer.centroids, expected, rtol=1e-7, atol=1e-7)
    assert torch.allclose(mixer.centroids[0, 0], torch.tensor([0.98, 0.06]).double() / math.sqrt(0.964))


def test_kmeans_step_is_the_same_formula_on_a_batch():
    """kmeans_step over a random batch equals the per-cluster formula computed with loops."""
    unit = F.normalize(torch.randn(3, 2, 20, 5, dtype=torch.float64), dim=-1)
    centroids = F.normalize(torch.randn(2, 4, 5, dtype=torch.float64), dim=-1)
    key_mask = torch.rand(3, 20) > 0.3
    new = kmeans_step(centroids, unit, key_mask, 0.95)
    for h in range(2):
        members = {c: [] for c in range(4)}
        for b in range(3):
            for i in range(20):
                if key_mask[b, i]:
                    members[int((centroids[h] @ unit[b, h, i]).argmax())].append(unit[b, h, i])
        for c in range(4):
            if members[c]:
                moved = 0.95 * centroids[h, c] + 0.05 * torch.stack(members[c]).mean(0)
                torch.testing.assert_close(new[h, c], moved / moved.norm(), rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(new[h, c], centroids[h, c])


def test_no_kmeans_update_in_eval(tiny_config):
    mixer = _kmeans_mixer(tiny_config).eval()
    before = mixer.centroids.clone()
    hidden, key_mask = _kmeans_batch()
    mixer(hidden, MixerInputs(None, key_mask, True))
    torch.testing.assert_close(mixer.centroids, before, rtol=0, atol=0)


def test_no_kmeans_update_while_recomputing_and_same_clusters(tiny_config):
    """A recomputed forward (reversible backward) moves nothing and reuses the original forward's centroids,
    so it reproduces the original output although the buffer has moved since."""
    mixer = _make(tiny_config, kmeans_decay=0.5).train()
    hidden = torch.randn(B, 19, D, dtype=torch.float64)
    before = mixer.centroids.clone()
    original = mixer(hidden, MixerInputs(None, None, True))
    moved = mixer.centroids.clone()
    assert not torch.allclose(moved, before)
    with recomputing():
        again = mixer(hidden, MixerInputs(None, None, True))
    torch.testing.assert_close(mixer.centroids, moved, rtol=0, atol=0)
    torch.testing.assert_close(again, original, rtol=0, atol=0)
    # the next original forward uses (and moves) the updated centroids
    mixer(hidden, MixerInputs(None, None, True))
    assert not torch.allclose(mixer.centroids, moved)


def test_reversible_backward_matches_plain_autograd(monkeypatch):
    """Reversible blocks rerun each forward in backward: with routing layers in training (centroids moving a
    lot, decay 0.5) the gradients equal those of the same two-stream forward kept by autograd, and the
    centroids move exactly once per step."""
    import longlm.attention.sliding  # noqa: F401
    import longlm.modeling_longlm as modeling
    from longlm.layers.reversible import _two_streams

    config = LongLMConfig.from_preset(
        "routing", num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_window=8, routing_layers=[1, 2], num_clusters=3, num_routing_heads=2,
        kmeans_decay=0.5, reversible=True,
    )
    model = LongLMForCausalLM(config).double().train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(2, config.vocab_size, (2, 40))

    def run():
        model.load_state_dict(start)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, {k: v.clone() for k, v in model.state_dict().items() if k.endswith("centroids")}

    reversible_grads, reversible_centroids = run()

    def plain_stack(blocks, hidden, inputs):
        y1, y2 = _two_streams(blocks, inputs, hidden, hidden)
        return (y1 + y2) / 2

    monkeypatch.setattr(modeling, "reversible_stack", plain_stack)
    plain_grads, plain_centroids = run()
    assert reversible_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(reversible_grads[name], plain_grads[name], rtol=1e-9, atol=1e-10, msg=name)
    for name in plain_centroids:
        torch.testing.assert_close(reversible_centroids[name], plain_centroids[name], rtol=0, atol=0)
        assert not torch.equal(plain_centroids[name], start[name])


def test_centroids_stay_unit_norm_and_are_saved(tiny_config, tmp_path):
    mixer = _make(tiny_config, kmeans_decay=0.3).train()
    for _ in range(5):
        mixer(torch.randn(B, 16, D, dtype=torch.float64), MixerInputs(None, None, False))
        torch.testing.assert_close(mixer.centroids.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    # the buffer travels with the model through save_pretrained / from_pretrained
    config = _config(tiny_config, num_hidden_layers=2)
    model = LongLMForCausalLM(config)
    centroids = model.model.layers[0].block.mixer.centroids
    with torch.no_grad():
        centroids.copy_(F.normalize(torch.randn_like(centroids), dim=-1))
    assert any(name.endswith("mixer.centroids") for name in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = LongLMForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.layers[0].block.mixer.centroids, centroids, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# bad input: one clear sentence each
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_routing_heads=0), r"num_routing_heads must be an integer in \[1, num_attention_heads=4\], got 0\."),
        (dict(num_routing_heads=5), r"num_routing_heads must be an integer in \[1, num_attention_heads=4\], got 5\."),
        (dict(num_clusters=0), r"num_clusters must be a positive integer, got 0\."),
        (dict(kmeans_decay=0.0), r"kmeans_decay must be a number in \(0, 1\), got 0\.0\."),
        (dict(kmeans_decay=1.0), r"kmeans_decay must be a number in \(0, 1\), got 1\.0\."),
        (dict(attention_window=0), r"attention_window must be a positive integer or a list of one per layer, got 0\."),
        (dict(attention_window=[8, -2]), r"attention_window must hold positive integers, got \[8, -2\]\."),
        (dict(attention_window=[8, 8, 8]), r"attention_window lists 3 windows but num_hidden_layers is 2"),
        (dict(mem_len=16), r"routing mixer attends within the segment only, so LongLMConfig.mem_len must be 0"),
    ],
)
def test_bad_config(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tiny_config, **overrides)


# --------------------------------------------------------------------------------------------------
# documents: block-diagonal by document, and nothing before a start reaches a token after it
# --------------------------------------------------------------------------------------------------
def _documents(starts_per_row, length):
    """`MixerInputs.documents` for the given document starts of each row (the model's `document_numbers`)."""
    starts = torch.zeros(len(starts_per_row), length, dtype=torch.bool)
    for row, starts_here in enumerate(starts_per_row):
        starts[row, starts_here] = True
    return document_numbers(starts, None)


# a start at 0; one inside; two inside; per row different, with a one-token document and one in the padding
_LAYOUTS = {
    "start-at-0": [[0], [0]],
    "one-inside": [[7], [7]],
    "two-inside": [[4, 11], [4, 11]],
    "per-row": [[3], [8, 9, 15]],
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_documents_match_dense_reference(tiny_config, causal, masked, layout):
    """Outputs and gradients equal the dense definition with clusters per document and the rule "same
    document" in every head (routing and local)."""
    mixer = _make(tiny_config)
    hidden = torch.randn(B, 17, D, dtype=torch.float64, requires_grad=True)
    key_mask = _key_mask(17) if masked else None
    documents = _documents(_LAYOUTS[layout], 17)
    reference = lambda x: dense_routing(mixer, x, causal, key_mask, documents=documents)
    _check_outputs_and_grads(mixer, reference, hidden, causal, key_mask, documents=documents)


def test_the_document_reference_is_per_document(tiny_config):
    """The reference itself: balanced groups never mix documents and each document gets ceil(L_d / C) tokens
    per centroid; causal ranks restart in every document."""
    mixer = _make(tiny_config)
    unit = F.normalize(torch.randn(17, DH, dtype=torch.float64), dim=-1)
    docs = _documents([[7]], 17)[0]
    valid = torch.ones(17, dtype=torch.bool)
    groups = _balanced_groups(unit, mixer.centroids[0], valid, docs)
    assert [len(g) for g in groups] == [3, 3, 3, 4, 4, 4]
    assert all(len({int(docs[i]) for i in g}) == 1 for g in groups)
    single = torch.zeros(17, 17, dtype=torch.bool)
    single[7:, 7:] = _causal_mask(unit[7:], mixer.centroids[0], valid[7:], 2)
    assert torch.equal(_causal_mask(unit, mixer.centroids[0], valid, 2, docs)[7:], single[7:])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("routing_heads", [2, H])
def test_tokens_before_a_start_change_nothing_after_it(tiny_config, causal, masked, routing_heads):
    """Two rows with a start at different positions: replacing every hidden state before the start leaves
    the outputs at and after it bit for bit equal (and, bidirectional, the other way round), although the
    earlier tokens fall into other clusters and take other slots of every group."""
    mixer = _make(tiny_config, num_routing_heads=routing_heads, attention_window=6)
    length, starts = 40, [11, 23]
    documents = _documents([[starts[0]], [starts[1]]], length)
    key_mask = _key_mask(length) if masked else None
    inputs = MixerInputs(None, key_mask, causal, documents=documents)
    hidden = torch.randn(B, length, D, dtype=torch.float64)
    before = torch.arange(length)[None, :] < torch.tensor(starts)[:, None]  # (B, L)
    changed = torch.where(before[..., None], torch.randn_like(hidden) * 3, hidden)
    with torch.no_grad():
        out, out_changed = mixer(hidden, inputs), mixer(changed, inputs)
        assert torch.equal(out[~before], out_changed[~before])
        assert not torch.allclose(out[before], out_changed[before])
        if not causal:
            later = torch.where(before[..., None], hidden, torch.randn_like(hidden) * 3)
            assert torch.equal(out[before], mixer(later, inputs)[before])


@pytest.mark.parametrize("causal", [True, False])
def test_one_document_equals_no_documents(tiny_config, causal):
    """`documents` numbering one document (a start at 0) gives the outputs of documents=None."""
    mixer = _make(tiny_config)
    hidden = torch.randn(B, 17, D, dtype=torch.float64)
    key_mask = _key_mask(17)
    with torch.no_grad():
        plain = mixer(hidden, MixerInputs(None, key_mask, causal))
        one = mixer(hidden, MixerInputs(None, key_mask, causal, documents=_documents([[0], [0]], 17)))
    torch.testing.assert_close(one, plain, rtol=0, atol=1e-12)


def test_document_slots_are_document_major():
    """The slot layouts themselves, per row and head: bidirectional groups are exactly the reference's
    per-document groups, contiguous and in position order, and the filler slots of a row with fewer slots
    than the widest row carry group -1; causal slots are sorted by (document, cluster, position)."""
    unit = F.normalize(torch.randn(2, 2, 30, 8, dtype=torch.float64), dim=-1)
    centroids = F.normalize(torch.randn(2, 4, 8, dtype=torch.float64), dim=-1)
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[0, :3] = False
    documents = _documents([[5, 6], [2, 4, 13, 20, 27]], 30)
    slots, groups = balanced_slots(unit, centroids, key_mask, documents)
    for row in range(2):
        sizes = torch.bincount(documents[row])
        real = 4 * int(((sizes + 3) // 4).sum())
        assert int((groups[row] >= 0).sum(-1).min()) == real == int((groups[row] >= 0).sum(-1).max())
        for head in range(2):
            found = {}
            for slot, group in zip(slots[row, head].tolist(), groups[row, head].tolist()):
                if group >= 0:
                    found.setdefault(group, []).append(slot)
            wanted = _balanced_groups(unit[row, head], centroids[head], key_mask[row], documents[row])
            docs = documents[row].unique().tolist()
            ids = [d * 4 + c for d in docs for c in range(4)]
            assert found == dict(zip(ids, wanted))
            runs = torch.unique_consecutive(groups[row, head][groups[row, head] >= 0])
            assert len(runs) == len(set(runs.tolist()))  # every group is one contiguous run of slots
    assert (groups[0] < 0).any()  # row 0 has fewer slots than row 1
    slots, groups = causal_slots(unit, centroids, key_mask, documents)
    cluster = (torch.einsum("brld,rcd->brlc", unit, centroids).argmax(-1)).masked_fill(~key_mask[:, None], 4)
    for row in range(2):
        for head in range(2):
            keys = [(int(documents[row, i]), int(cluster[row, head, i]), i) for i in range(30)]
            assert slots[row, head].tolist() == [i for _, _, i in sorted(keys)]
