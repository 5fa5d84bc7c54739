"""Memorizing Transformer: the `knn` store (memory) and the kNN-augmented attention (mixer)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.remote_code_check import run_remote
from longlm import LongLMConfig, LongLMForCausalLM
from longlm.modeling_longlm import generated_memory
from longlm.attention.base import MixerInputs
from longlm.attention.knn import KNNAttention, KNNStore, search_faiss, search_torch
from longlm.attention.relative import RelativeAttention
from longlm.data import CORPORA, SegmentStreams
from longlm.data.streams import memory_for_segment
from longlm.memory.knn import KNNMemoryState
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, REPO, requires_shared_data

SEG = 8
KNN = dict(preset="memorizing", knn_layers=[1], knn_memory_size=20, knn_top_k=4)


@pytest.fixture
def knn_config(tiny_config):
    def make(**overrides) -> LongLMConfig:
        return tiny_config(**{**KNN, **overrides})

    return make


def _model(config, dtype=torch.float64) -> LongLMForCausalLM:
    config.initializer_range = 0.1
    return LongLMForCausalLM(config).to(dtype).eval()


def _ids(config, *shape):
    return torch.randint(2, config.vocab_size, shape)


def _run(model, segments, memory=None):
    outs = []
    with torch.no_grad():
        for ids in segments:
            out = model(ids, memory=memory)
            memory = out.memory
            outs.append(out.logits)
    return outs, memory


def _random_store(batch=3, heads=2, size=12, dim=8, dtype=torch.float32, valid=None):
    keys = F.normalize(torch.randn(batch, heads, size, dim, dtype=dtype), dim=-1)
    values = torch.randn(batch, heads, size, dim, dtype=dtype)
    if valid is None:
        valid = torch.rand(batch, size) > 0.3
    return KNNStore(keys, values, valid)


def _brute_force(queries, store, k):
    """Python loops over (row, head, query): the k valid slots with the largest inner product."""
    batch, heads, length, _ = queries.shape
    result = torch.full((batch, heads, length, k), -1, dtype=torch.long)
    for b in range(batch):
        slots = [s for s in range(store.size) if store.valid[b, s]]
        for h in range(heads):
            for i in range(length):
                ranked = sorted(slots, key=lambda s: -float(queries[b, h, i] @ store.keys[b, h, s]))[:k]
                result[b, h, i, : len(ranked)] = torch.tensor(ranked, dtype=torch.long)
    return result


# --- retrieval ------------------------------------------------------------------------------------
def test_torch_retrieval_equals_brute_force_neighbours():
    store = _random_store(dtype=torch.float64)
    store.valid[1, :10] = False  # only 2 valid slots: fewer than k
    queries = F.normalize(torch.randn(3, 2, 5, 8, dtype=torch.float64), dim=-1)
    indices, found = search_torch(queries, store, top_k=4)
    expected = _brute_force(queries, store, 4)
    assert torch.equal(found, expected >= 0)
    assert torch.equal(torch.where(found, indices, -1), expected)
    # the retrieved keys/values are those of the brute-force neighbours
    from longlm.attention.knn import gather_entries

    safe = expected.clamp(min=0)
    torch.testing.assert_close(gather_entries(store.keys, indices)[found], gather_entries(store.keys, safe)[found], rtol=0, atol=0)
    torch.testing.assert_close(gather_entries(store.values, indices)[found], gather_entries(store.values, safe)[found], rtol=0, atol=0)


def test_faiss_and_torch_find_the_same_neighbours(knn_config):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    store = _random_store(batch=3, heads=2, size=40, dim=16)
    store.valid[2] = False  # an empty row
    queries = F.normalize(torch.randn(3, 2, 7, 16), dim=-1)
    torch_idx, torch_found = search_torch(queries, store, top_k=5)
    faiss_idx, faiss_found = search_faiss(queries, store, top_k=5)
    assert torch.equal(torch_found, faiss_found) and not bool(torch_found[2].any())
    assert torch.equal(torch_idx[torch_found], faiss_idx[faiss_found])
    # and whole models with either backend agree
    config = knn_config()
    model = _model(config, dtype=torch.float32)
    segments = [_ids(config, 2, SEG) for _ in range(4)]
    logits_torch, _ = _run(model, segments)
    model.with_memory(knn_backend="faiss")
    logits_faiss, _ = _run(model, segments)
    for a, b in zip(logits_torch, logits_faiss):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_row_retrieves_another_rows_keys():
    store = _random_store(batch=2, heads=2, size=10, dim=8)
    store.valid[:] = True
    store.valid[1, :] = False
    # row 0's queries equal row 1's keys: they would match row 1's slots if rows could see each other
    queries = store.keys[1:2, :, :4].clone().expand(2, -1, -1, -1).contiguous()
    store.keys[0] = -store.keys[1]
    indices, found = search_torch(queries, store, top_k=3)
    assert not bool(found[1].any())  # row 1's store is empty: nothing, not row 0's keys
    assert bool(found[0].all())
    # in a model: a row's memory output does not change when another row's store changes
    config = LongLMConfig.from_preset("memorizing", num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, knn_layers=[0], knn_memory_size=10, knn_top_k=3, mem_len=0)
    mixer = KNNAttention(config, 0).double()
    full = _random_store(batch=2, heads=2, size=10, dim=8, dtype=torch.float64)
    other = KNNStore(full.keys.clone(), full.values.clone(), full.valid.clone())
    other.keys[1] = F.normalize(torch.randn_like(other.keys[1]), dim=-1)
    other.values[1] = torch.randn_like(other.values[1])
    hidden = torch.randn(2, 5, 16, dtype=torch.float64)
    out_a = mixer(hidden, MixerInputs(None, None, True, payload=full)).hidden
    out_b = mixer(hidden, MixerInputs(None, None, True, payload=other)).hidden
    torch.testing.assert_close(out_a[0], out_b[0], rtol=0, atol=0)
    assert not torch.allclose(out_a[1], out_b[1])


# --- the gate ---------------------------------------------------------------------------------------
def _memory_only_reference(mixer, hidden, store):
    """softmax(t_h q̂.k̂) v over the top-k valid slots, computed densely (no retrieval code involved)."""
    q = mixer.split_heads(mixer.q_proj(hidden))
    unit_q = F.normalize(q, dim=-1)
    scores = torch.einsum("bhld,bhsd->bhls", unit_q, store.keys)
    scores = scores.masked_fill(~store.valid[:, None, None, :], float("-inf"))
    kth = scores.topk(mixer.config.knn_top_k, dim=-1).values[..., -1:]
    scale = math.sqrt(mixer.head_dim) * mixer.memory_log_scale.exp()[None, :, None, None]
    weights = torch.softmax((scores * scale).masked_fill(scores < kth, float("-inf")), dim=-1)
    return mixer.o_proj(mixer.merge_heads(weights @ store.values))


@pytest.mark.parametrize("with_xl", [False, True])
def test_gate_extremes_give_pure_memory_and_pure_local_attention(with_xl):
    config = LongLMConfig.from_preset("memorizing", num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, knn_layers=[0], knn_memory_size=12, knn_top_k=3, mem_len=4)
    config.initializer_range = 0.3
    model_mixer = LongLMForCausalLM(config).double().model.layers[0].block.mixer
    local = RelativeAttention(config, 0).double()
    local.load_state_dict(model_mixer.state_dict(), strict=False)
    hidden = torch.randn(2, 5, 16, dtype=torch.float64)
    memory = torch.randn(2, 4, 16, dtype=torch.float64) if with_xl else None
    store = _random_store(batch=2, heads=2, size=12, dim=8, dtype=torch.float64)
    inputs = MixerInputs(memory, None, True, payload=store)
    with torch.no_grad():
        model_mixer.gate_bias.fill_(-30.0)
        torch.testing.assert_close(model_mixer(hidden, inputs).hidden, local(hidden, inputs), rtol=1e-10, atol=1e-10)
        model_mixer.gate_bias.fill_(30.0)
        torch.testing.assert_close(model_mixer(hidden, inputs).hidden, _memory_only_reference(model_mixer, hidden, store), rtol=1e-10, atol=1e-10)
        model_mixer.gate_bias.fill_(0.0)  # in between: the exact mixture before o_proj (which is linear)
        mixed = model_mixer(hidden, inputs).hidden
        half = 0.5 * (local(hidden, inputs) + _memory_only_reference(model_mixer, hidden, store))
        torch.testing.assert_close(mixed, half, rtol=1e-10, atol=1e-10)
        # with an empty store the layer is its local attention, whatever the gate
        empty = KNNStore(store.keys, store.values, torch.zeros_like(store.valid))
        torch.testing.assert_close(model_mixer(hidden, MixerInputs(memory, None, True, payload=empty)).hidden, local(hidden, inputs), rtol=1e-10, atol=1e-10)


# --- the store --------------------------------------------------------------------------------------
def test_store_holds_last_pairs_and_reset_rows_clears_only_those_rows(knn_config):
    config = knn_config(knn_memory_size=20)
    model = _model(config)
    segments = [_ids(config, 3, SEG) for _ in range(4)]
    _, memory = _run(model, segments)
    assert isinstance(memory, KNNMemoryState)
    assert memory.keys[0].shape == (3, config.num_attention_heads, 20, config.head_dim) and bool(memory.store_valid.all())
    # the store is the last 20 (unit key, value) pairs of the knn layer, recomputed here from layer inputs
    with torch.no_grad():
        mem = None
        inputs = []
        for ids in segments:
            o = model(ids, memory=mem, output_hidden_states=True)
            inputs.append(o.hidden_states[1])
            mem = o.memory
    assert not memory.keys[0].requires_grad
    block = model.model.layers[1].block
    x = torch.cat(inputs, dim=1)[:, -20:]
    kv = block.mixer.kv_proj(block.mixer_norm(x) if config.pre_norm else x)
    k, v = (block.mixer.split_heads(t) for t in kv.chunk(2, dim=-1))
    torch.testing.assert_close(memory.keys[0], F.normalize(k, dim=-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(memory.values[0], v, rtol=1e-10, atol=1e-10)
    reset = memory.reset_rows(torch.tensor([False, True, False]))
    assert not bool(reset.store_valid[1].any()) and not bool(reset.valid[1].any())
    for row in (0, 2):
        assert torch.equal(reset.keys[0][row], memory.keys[0][row]) and torch.equal(reset.values[0][row], memory.values[0][row])
        assert bool(reset.store_valid[row].all()) and torch.equal(reset.hidden[0][row], memory.hidden[0][row])
    assert bool(memory.store_valid.all())  # the original state is untouched
    # a reset row behaves exactly as a fresh stream; the others as before
    ids = _ids(config, 3, SEG)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, memory=reset).logits[1], model(ids[1:2]).logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(ids, memory=reset).logits[[0, 2]], model(ids, memory=memory).logits[[0, 2]], rtol=0, atol=0)


def test_padding_is_stored_as_invalid_and_state_round_trips(knn_config, tmp_path):
    config = knn_config()
    model = _model(config)
    a, b = _ids(config, 2, SEG), _ids(config, 2, SEG)
    mask = torch.ones(2, SEG, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        memory = model(a, attention_mask=mask).memory
        assert memory.store_valid[0].tolist() == [False] * 3 + [True] * (SEG - 3) and bool(memory.store_valid[1].all())
        torch.save(memory.to_dict(), tmp_path / "m.pt")
        restored = model.model.memory.state_from_dict(torch.load(tmp_path / "m.pt", weights_only=True))
        torch.testing.assert_close(model(b, memory=restored).logits, model(b, memory=memory).logits, rtol=0, atol=0)
        index = torch.tensor([1, 0])
        torch.testing.assert_close(model(b[index], memory=memory.select_rows(index)).logits, model(b, memory=memory).logits[index], rtol=1e-10, atol=1e-10)


@requires_shared_data
def test_store_is_cleared_at_a_real_document_boundary(tmp_path):
    corpus = CORPORA.get("pg19")(PG19_SAMPLE, cache_dir=tmp_path, vocab_size=1000)
    split = corpus.split("train")
    boundary = int(split.doc_starts[1])  # where the second book begins
    seg_len, stream_len = 16, 100
    base = boundary - stream_len - 2 * seg_len  # row 1's segment 2 starts exactly at that book
    tokens = np.asarray(split.tokens[base : base + 2 * stream_len])
    doc_starts = np.asarray(split.doc_starts) - base
    streams = SegmentStreams(tokens, batch_size=2, seg_len=seg_len, doc_starts=doc_starts[(doc_starts >= 0) & (doc_starts < len(tokens))])
    config = LongLMConfig.from_preset("memorizing", num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=1000, mem_len=8, knn_layers=[1], knn_memory_size=64, knn_top_k=4)
    model = LongLMForCausalLM(config).eval()
    memory = None
    with torch.no_grad():
        for index in range(4):
            batch = streams.segment(index)
            assert batch["new_document"].tolist() == [index == 0, index in (0, 2)]
            memory = memory_for_segment(memory, batch)
            if index == 2:  # row 1 starts the new book: its store is empty, row 0's is not
                assert not bool(memory.store_valid[1].any()) and bool(memory.store_valid[0].all())
                assert memory.store_valid.shape[1] == 2 * seg_len
            memory = model(batch["input_ids"], memory=memory).memory
    # after segments 2 and 3 row 1 holds only the new book's tokens
    assert memory.store_valid[1].tolist() == [False] * (2 * seg_len) + [True] * (2 * seg_len)
    assert bool(memory.store_valid[0].all())


# --- the model ------------------------------------------------------------------------------------
def test_two_identical_runs_give_identical_outputs(knn_config):
    config = knn_config()
    model = _model(config, dtype=torch.float32)
    segments = [_ids(config, 2, SEG) for _ in range(5)]
    first, _ = _run(model, segments)
    second, _ = _run(model, segments)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_every_parameter_gets_a_gradient(knn_config):
    config = knn_config(hidden_dropout_prob=0.1)
    model = _model(config).train()
    memory = model(_ids(config, 2, SEG)).memory.detach()
    model(_ids(config, 2, SEG), memory=memory, labels=_ids(config, 2, SEG)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_the_knn_memory_carries_beyond_the_xl_cache(knn_config):
    """With mem_len=0 only the store can reach earlier segments: outputs depend on them."""
    config = knn_config(mem_len=0)
    model = _model(config)
    a, b, c = (_ids(config, 2, SEG) for _ in range(3))
    (logits_with, *_), _ = _run(model, [c], memory=_run(model, [a, b])[1])
    fresh = _run(model, [c])[0][0]
    assert (logits_with - fresh).abs().max() > 1e-4
    with torch.no_grad():
        model.model.layers[1].block.mixer.gate_bias.fill_(-30.0)  # gate closed: the store is ignored
    (closed, *_), _ = _run(model, [c], memory=_run(model, [a, b])[1])
    torch.testing.assert_close(closed, _run(model, [c])[0][0], rtol=1e-10, atol=1e-10)


def test_save_and_from_pretrained_give_identical_logits(knn_config, tmp_path):
    config = knn_config()
    model = _model(config, dtype=torch.float32)
    segments = [_ids(config, 2, SEG) for _ in range(3)]
    model.save_pretrained(tmp_path / "m")
    again = LongLMForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.mixers[1] == "knn" and again.config.memory == "knn"
    for a, b in zip(_run(model, segments)[0], _run(again, segments)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trust_remote_code_loads_without_longlm(knn_config, tmp_path):
    config = knn_config()
    model = _model(config, dtype=torch.float32)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    assert (folder / "attention_knn.py").exists() and (folder / "memory_knn.py").exists()
    segments = [_ids(config, 2, SEG) for _ in range(3)]
    remote = run_remote(folder, segments, tmp_path)
    assert not remote["faiss_imported"]
    for a, b in zip(_run(model, segments)[0], remote["logits"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generate_carries_the_memory(knn_config):
    config = knn_config(mem_len=32)
    model = _model(config, dtype=torch.float32)
    prompt = _ids(config, 2, SEG)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        memory = generated_memory(out)
        assert isinstance(memory, KNNMemoryState)
        # prompt + generated tokens are one segment: held back from the store while it goes on (they are
        # attended through the XL cache), committed when the next segment begins
        assert memory.num_tokens == SEG + 5 and memory.store_valid is None and memory.pending_valid.shape[1] == SEG + 5
        committed = model.model.memory.begin_segment(memory)
        assert committed.store_valid.shape[1] == min(SEG + 5, config.knn_memory_size) and committed.pending_valid is None
        # the first generated token is the argmax of the prompt's last logits
        assert torch.equal(out.sequences[:, SEG], model(prompt).logits[:, -1].argmax(-1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(knn_top_k=64, knn_memory_size=32), "knn_top_k (64) must not exceed knn_memory_size (32)"),
        (dict(knn_top_k=0), "knn_top_k must be a positive integer"),
        (dict(knn_backend="annoy"), "Unknown knn_backend 'annoy'"),
        (dict(memory="xl"), "needs memory='knn'"),
        (dict(knn_layers=None), "memory='knn' needs at least one knn layer"),
    ],
)
def test_config_errors(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**{**KNN, **overrides})


@requires_shared_data
def test_pretrain_script_fits_exports_and_evaluate_reads_it(tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(args):
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    run([
        str(REPO / "scripts" / "pretrain.py"), "fit", "--config", str(REPO / "configs" / "enwik8" / "memorizing-tiny.yaml"),
        "--data.path", str(ENWIK8_SAMPLE), "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root), "--data.batch_size", "4",
    ])
    assert (root / "hf" / "config.json").exists()
    saved = json.loads((root / "hf" / "config.json").read_text())
    assert saved["memory"] == "knn" and saved["layer_mixers"][1] == "knn" and "knn_layers" not in saved
    last = json.loads(run([
        str(REPO / "scripts" / "evaluate.py"), str(root / "hf"), "--dataset", "enwik8", "--path", str(ENWIK8_SAMPLE),
        "--split", "test", "--cache-dir", str(tmp_path / "cache"), "--tgt-len", "32", "--batch-size", "4", "--max-segments", "4",
    ]).strip().splitlines()[-1])
    assert 0 < last["bits_per_character"] < 9


@requires_shared_data
def test_store_is_cleared_where_a_document_ends_inside_a_segment(tmp_path):
    """A real book boundary in the middle of a segment: tokens of the new book retrieve nothing from the old
    book's pairs and attend none of its tokens (they compute what the new book alone computes), and afterwards
    the row's store holds only the new book's pairs."""
    corpus = CORPORA.get("pg19")(PG19_SAMPLE, cache_dir=tmp_path, vocab_size=1000)
    split = corpus.split("train")
    boundary = int(split.doc_starts[1])
    seg_len, stream_len, inside = 16, 100, 5
    base = boundary - stream_len - 2 * seg_len - inside  # row 1's segment 2 holds the boundary at offset 5
    tokens = np.asarray(split.tokens[base : base + 2 * stream_len])
    doc_starts = np.asarray(split.doc_starts) - base
    streams = SegmentStreams(tokens, batch_size=2, seg_len=seg_len, doc_starts=doc_starts[(doc_starts >= 0) & (doc_starts < len(tokens))])
    config = LongLMConfig.from_preset("memorizing", num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=1000, mem_len=0, knn_layers=[1], knn_memory_size=64, knn_top_k=4)
    model = LongLMForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[1].block.mixer.gate_bias.fill_(2.0)  # the store weighs in strongly
        memory = None
        for index in range(2):
            batch = streams.segment(index)
            memory = model(batch["input_ids"], memory=memory_for_segment(memory, batch), document_starts=batch["document_starts"]).memory
        batch = streams.segment(2)
        starts = batch["document_starts"]
        assert starts[1].nonzero().flatten().tolist() == [inside] and not bool(starts[0].any())
        assert batch["new_document"].tolist() == [False, False]
        memory = memory_for_segment(memory, batch)
        out = model(batch["input_ids"], memory=memory, document_starts=starts)
        unaware = model(batch["input_ids"], memory=memory)  # as if the boundary were not known
        alone = model(batch["input_ids"][1:, inside:])  # the new book by itself: no store, nothing before it
    new_book = out.logits[1, inside:]
    torch.testing.assert_close(new_book, alone.logits[0], rtol=1e-6, atol=1e-6)
    assert (unaware.logits[1, inside:] - new_book).abs().max() > 1e-3  # the old book's pairs would have been retrieved
    torch.testing.assert_close(out.logits[1, :inside], unaware.logits[1, :inside], rtol=0, atol=0)  # the old book's tail still retrieves
    torch.testing.assert_close(out.logits[0], unaware.logits[0], rtol=0, atol=0)  # the other row is untouched
    kept = out.memory.store_valid
    assert kept[1].tolist() == [False] * (2 * seg_len + inside) + [True] * (seg_len - inside)
    assert bool(kept[0].all())
