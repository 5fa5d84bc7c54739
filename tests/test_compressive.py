"""Compressive memory (Rae et al. 2020): contents, the reconstruction loss, reduction to xl, HF and training faces."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.remote_code_check import run_remote
from longlm import LongLMForCausalLM
from longlm.memory.compressive import CompressiveMemoryState
from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data

SEG, MEM, CMEM, RATE = 5, 8, 4, 3


def _config(tiny_config, **overrides):
    values = dict(memory="compressive", mem_len=MEM, cmem_len=CMEM, compression_rate=RATE, compression_fn="conv")
    return tiny_config("compressive", **{**values, **overrides})


def _model(config) -> LongLMForCausalLM:
    config.initializer_range = 0.1  # attention far from uniform
    return LongLMForCausalLM(config).double().eval()


def _ids(config, *shape):
    return torch.randint(2, config.vocab_size, shape)


def _randomise_conv(model):
    with torch.no_grad():
        for compress in model.model.memory.compress:
            compress.weight.normal_(0, 0.2)
            compress.bias.normal_(0, 0.2)


def _hand_compress(fn, blocks, compress):
    """blocks (B, n, rate, D) -> (B, n, D), written out independently of the implementation."""
    if fn == "mean":
        return blocks.mean(dim=2)
    if fn == "max":
        return blocks.max(dim=2).values
    # conv with kernel = stride = rate: out[b, n, o] = sum_k sum_i W[o, i, k] x[b, n, k, i] + bias[o]
    return torch.einsum("oik,bnki->bno", compress.weight, blocks) + compress.bias


@pytest.mark.parametrize("fn", ["mean", "max", "conv", "most_used"])
def test_memory_holds_last_mem_len_and_compression_of_the_next_oldest(tiny_config, fn):
    config = _config(tiny_config, compression_fn=fn)
    model = _model(config)
    if fn == "conv":
        _randomise_conv(model)
    memory, seen = None, [[] for _ in range(config.num_hidden_layers)]
    with torch.no_grad():
        for n in range(1, 7):
            out = model(_ids(config, 2, SEG), memory=memory, output_hidden_states=True)
            memory = out.memory
            assert isinstance(memory, CompressiveMemoryState) and memory.num_tokens == n * SEG
            total = n * SEG
            evicted = max(total - MEM, 0)
            blocks = evicted // RATE
            for layer, states in enumerate(seen):
                states.append(out.hidden_states[layer])  # the input of `layer` in this segment
                stream = torch.cat(states, dim=1)
                torch.testing.assert_close(memory.hidden[layer], stream[:, -MEM:], rtol=0, atol=0)
                torch.testing.assert_close(memory.pending[layer], stream[:, blocks * RATE : evicted], rtol=0, atol=0)
                grouped = stream[:, : blocks * RATE].reshape(2, blocks, RATE, config.hidden_size)
                got = memory.compressed[layer]
                assert got.shape == (2, min(blocks, CMEM), config.hidden_size)
                if fn == "most_used":  # each compressed state is one state of its block
                    kept = grouped[:, blocks - got.shape[1] :]
                    assert bool(((kept - got[:, :, None]).abs().amax(-1) == 0).any(-1).all())
                else:
                    expected = _hand_compress(fn, grouped, model.model.memory.compress[layer])[:, -CMEM:]
                    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
            assert bool(memory.valid.all()) and bool(memory.compressed_valid.all()) and memory.fully_valid
    assert blocks > CMEM  # the compressed memory has also dropped its oldest states


def test_reconstruction_loss_trains_only_the_compression(tiny_config):
    config = _config(tiny_config)
    model = _model(config).train()
    _randomise_conv(model)
    memory = None
    with torch.no_grad():
        for _ in range(2):
            memory = model(_ids(config, 2, SEG), memory=memory).memory
    out = model(_ids(config, 2, SEG), memory=memory, labels=_ids(config, 2, SEG))
    aux = out.aux_losses["attention_reconstruction"]
    assert float(aux) > 0
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(aux, params, allow_unused=True)
    for name, grad in zip(names, grads):
        if name.startswith("model.memory.compress."):
            assert grad is not None and float(grad.abs().sum()) > 0, name
        else:
            assert grad is None or float(grad.abs().sum()) == 0, name
    # the compressed memory the main network attends carries no gradient to the compression
    assert all(c.grad_fn is None and not c.requires_grad for c in out.memory.compressed)
    lm_grads = torch.autograd.grad(out.lm_loss, params, allow_unused=True)
    assert all(g is None for n, g in zip(names, lm_grads) if n.startswith("model.memory.compress."))


def test_cmem_len_zero_is_exactly_the_xl_memory(tiny_config):
    xl = _model(tiny_config("transformer-xl", mem_len=MEM))
    compressive = _model(_config(tiny_config, cmem_len=0, compression_rate=None))
    assert not list(compressive.model.memory.parameters())
    compressive.load_state_dict(xl.state_dict())
    memory_xl = memory_c = None
    with torch.no_grad():
        for _ in range(4):
            ids = _ids(xl.config, 2, SEG)
            out_xl, out_c = xl(ids, memory=memory_xl), compressive(ids, memory=memory_c)
            torch.testing.assert_close(out_c.logits, out_xl.logits, rtol=0, atol=0)
            memory_xl, memory_c = out_xl.memory, out_c.memory
            assert memory_c.compressed[0].shape[1] == 0 and memory_c.pending[0].shape[1] == 0


def test_every_parameter_trains_over_two_steps(tiny_config):
    """Peer defect: a port detached its k/v projections in place, so they stopped training after step 1."""
    config = _config(tiny_config)
    model = _model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    memory = None
    with torch.no_grad():  # fill the memory, so that every step below compresses (and trains the conv)
        for _ in range(2):
            memory = model(_ids(config, 2, SEG), memory=memory).memory
    for step in range(2):
        optimizer.zero_grad()
        out = model(_ids(config, 2, SEG), memory=memory, labels=_ids(config, 2, SEG))
        out.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
        assert not missing, (step, missing)
        optimizer.step()
        memory = out.memory.detach()


def test_memory_and_compressed_memory_carry(tiny_config):
    config = _config(tiny_config)
    model = _model(config)
    ids = _ids(config, 2, SEG)
    with torch.no_grad():
        memory = None
        for _ in range(4):
            memory = model(_ids(config, 2, SEG), memory=memory).memory
        with_state = model(ids, memory=memory).logits
        assert not torch.allclose(with_state, model(ids).logits)
        import dataclasses

        hide_compressed = dataclasses.replace(
            memory, compressed_valid=torch.zeros_like(memory.compressed_valid), fully_valid=False
        )
        assert not torch.allclose(with_state, model(ids, memory=hide_compressed).logits)


def test_two_identical_runs_are_identical(tiny_config):
    def run():
        torch.manual_seed(3)
        config = _config(tiny_config, hidden_dropout_prob=0.1)
        model = _model(config).train()
        memory, outputs = None, []
        for _ in range(3):
            out = model(_ids(config, 2, SEG), memory=memory, labels=_ids(config, 2, SEG))
            outputs.append((out.logits.detach(), out.loss.detach()))
            memory = out.memory.detach()
        return outputs, memory

    (first, memory_a), (second, memory_b) = run(), run()
    for (logits_a, loss_a), (logits_b, loss_b) in zip(first, second):
        assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(memory_a.compressed, memory_b.compressed))


def test_reset_rows_resets_only_those_rows(tiny_config):
    config = _config(tiny_config)
    model = _model(config)
    rows = torch.tensor([True, False])
    b, c = _ids(config, 2, SEG), _ids(config, 2, SEG)
    with torch.no_grad():
        memory = None
        for _ in range(4):
            memory = model(_ids(config, 2, SEG), memory=memory).memory
        reset = memory.reset_rows(rows)
        assert not reset.fully_valid and reset.num_tokens == memory.num_tokens
        for valid in (reset.valid, reset.compressed_valid, reset.pending_valid):
            assert not bool(valid[0].any()) and bool(valid[1].all())
        out_reset, out_kept = model(b, memory=reset), model(b, memory=memory)
        torch.testing.assert_close(out_reset.logits[0], model(b).logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_reset.logits[1], out_kept.logits[1], rtol=0, atol=0)
        # later segments: row 0 behaves as if its stream started at b (invalid blocks stay masked)
        after = model(c, memory=out_reset.memory)
        torch.testing.assert_close(after.logits[0], model(c[:1], memory=model(b[:1]).memory).logits[0], rtol=1e-10, atol=1e-10)
    assert bool(memory.valid.all()) and bool(memory.compressed_valid.all())  # not modified in place


def test_state_round_trips_and_selects_rows(tiny_config, tmp_path):
    config = _config(tiny_config)
    model = _model(config)
    b = _ids(config, 3, SEG)
    with torch.no_grad():
        memory = None
        for _ in range(3):
            memory = model(_ids(config, 3, SEG), memory=memory).memory
        torch.save(memory.to_dict(), tmp_path / "memory.pt")
        restored = model.model.memory.state_from_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
        assert restored.num_tokens == memory.num_tokens and restored.fully_valid == memory.fully_valid
        torch.testing.assert_close(model(b, memory=restored).logits, model(b, memory=memory).logits, rtol=0, atol=0)
        index = torch.tensor([2, 0])
        torch.testing.assert_close(
            model(b[index], memory=memory.select_rows(index)).logits, model(b, memory=memory).logits[index], rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(cmem_len=4, compression_rate=None), r"cmem_len=4 needs compression_rate"),
        (dict(compression_rate=0), r"compression_rate must be an integer >= 1, got 0"),
        (dict(compression_fn="median"), r"Unknown compression_fn 'median'; expected one of \['conv', 'max', 'mean', 'most_used'\]"),
        (dict(cmem_len=-1), r"cmem_len must be a non-negative integer, got -1"),
        (dict(mem_len=0), r"memory='compressive' needs mem_len > 0"),
        (dict(same_length=True), r"same_length .* would hide the compressed memory"),
    ],
)
def test_bad_config_says_what_is_wrong(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tiny_config, **overrides)


def test_save_pretrained_then_from_pretrained(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    config = _config(tiny_config)
    model = LongLMForCausalLM(config).eval()
    _randomise_conv(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    a, b, c = (_ids(config, 2, SEG) for _ in range(3))
    with torch.no_grad():
        m1 = m2 = None
        for ids in (a, b, c, a):
            o1, o2 = model(ids, memory=m1), loaded(ids, memory=m2)
            torch.testing.assert_close(o2.logits, o1.logits, rtol=0, atol=0)
            m1, m2 = o1.memory, o2.memory
    assert m1.compressed[0].shape[1] > 0


def test_trust_remote_code_loads_without_longlm(tiny_config, tmp_path):
    config = _config(tiny_config)
    model = LongLMForCausalLM(config).eval()
    _randomise_conv(model)
    save_dir = tmp_path / "model"
    model.save_pretrained(save_dir)
    assert (save_dir / "memory_compressive.py").exists()
    segments = [_ids(config, 2, SEG) for _ in range(4)]
    expected, memory = [], None
    with torch.no_grad():
        for ids in segments:
            out = model(ids, memory=memory)
            memory = out.memory
            expected.append(out.logits)
    outputs = run_remote(save_dir, segments, tmp_path)
    assert outputs["memory_type"] == "CompressiveMemoryState"
    for got, want in zip(outputs["logits"], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_greedy_generate_carries_memory_and_equals_full_rerun_while_it_fits(tiny_config):
    """While prompt + new tokens fit in mem_len nothing is compressed, so generate (one token per step plus
    the memory) must equal re-running the whole sequence. Beyond that the two differ by design: the re-run
    sees every token exactly, the memory sees older tokens only compressed."""
    config = _config(tiny_config, mem_len=16, eos_token_id=None, tie_word_embeddings=False)
    model = _model(config)
    prompt = _ids(config, 2, 5)
    expected = prompt
    with torch.no_grad():
        for _ in range(8):
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.tolist() == expected.tolist()
    assert lengths == [5] + [1] * 7
    # longer than mem_len: still runs, with a compressed memory built token by token
    longer = model.generate(prompt, max_new_tokens=30, do_sample=False)
    assert longer.shape == (2, 35)


@requires_shared_data
def test_pretrain_script_logs_reconstruction_loss_and_exports_for_evaluate(tmp_path):
    root = tmp_path / "run"
    args = [
        str(REPO / "scripts" / "pretrain.py"), "fit", "--config", str(REPO / "configs" / "enwik8" / "compressive-tiny.yaml"),
        "--data.path", str(ENWIK8_SAMPLE), "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(root), "--data.batch_size", "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (metrics,) = (root / "logs").glob("version_*/metrics.csv")
    with open(metrics) as handle:
        rows = list(csv.DictReader(handle))
    values = [float(r["train_attention_reconstruction"]) for r in rows if r.get("train_attention_reconstruction")]
    assert len(values) == 3 and values[0] == 0.0 and values[-1] > 0  # step 1 compresses nothing yet
    assert json.loads((root / "hf" / "config.json").read_text())["memory"] == "compressive"
    evaluate = [
        str(REPO / "scripts" / "evaluate.py"), str(root / "hf"), "--dataset", "enwik8", "--path", str(ENWIK8_SAMPLE),
        "--split", "test", "--cache-dir", str(tmp_path / "cache"), "--tgt-len", "32", "--batch-size", "4", "--max-segments", "8",
    ]
    result = subprocess.run([sys.executable, *evaluate], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < last["bits_per_character"] < 9
