"""The Hugging Face models: causality, loss, save/load (also as remote code), generate, checkpointing."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import longlm  # noqa: F401  (registers the Auto classes)
from tests.remote_code_check import run_remote
from longlm.attention.kv_cache import KVCacheState
from longlm import LongLMConfig, LongLMForCausalLM, LongLMModel
from longlm.layers.block import LongLMBlock

SEG = 8


def _model(config, dtype=torch.float64) -> LongLMForCausalLM:
    config.initializer_range = 0.1  # large enough that attention is far from uniform
    return LongLMForCausalLM(config).to(dtype).eval()


def _ids(config, *shape):
    return torch.randint(2, config.vocab_size, shape)


CAUSAL_CASES = [
    ("transformer-xl", {}),
    ("transformer-xl", {"same_length": True, "mem_len": 5}),
    ("full", {}),
    ("full", {"memory": "xl"}),
    ("transformer-xl", {"mixer": ["relative", "full"], "position_embedding_type": "rotary"}),
]


@pytest.mark.parametrize("preset, overrides", CAUSAL_CASES)
@pytest.mark.parametrize("with_memory", [False, True])
def test_changing_token_t_never_changes_earlier_logits(tiny_config, preset, overrides, with_memory):
    config = tiny_config(preset, **overrides)
    model = _model(config)
    ids = _ids(config, 2, SEG)
    with torch.no_grad():
        memory = model(_ids(config, 2, SEG)).memory if with_memory else None
        if with_memory and config.memory == "xl":
            assert memory.length > 0
        base = model(ids, memory=memory).logits
        for t in (0, 3, SEG - 1):
            changed = ids.clone()
            changed[:, t] = 2 + (changed[:, t] - 2 + 1) % (config.vocab_size - 2)
            logits = model(changed, memory=memory).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-12)
            assert (logits[:, t] - base[:, t]).abs().max() > 1e-6  # the change is seen where it may be


def test_bidirectional_model_sees_later_tokens(tiny_config):
    """Sanity check of the causality test's sensitivity: with is_decoder=False, earlier logits do change."""
    model = _model(tiny_config(is_decoder=False))
    ids = _ids(model.config, 1, SEG)
    changed = ids.clone()
    changed[:, -1] = 2 + (changed[:, -1] - 2 + 1) % (model.config.vocab_size - 2)
    with torch.no_grad():
        assert (model(ids).logits[:, 0] - model(changed).logits[:, 0]).abs().max() > 1e-6


def test_loss_uses_shifted_labels(tiny_config):
    config = tiny_config()
    model = _model(config)
    ids = _ids(config, 2, SEG)
    with torch.no_grad():
        out = model(ids, labels=ids)
        expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(out.loss, expected.to(out.loss.dtype), rtol=1e-10, atol=1e-10)
        targets = _ids(config, 2, SEG)
        out = model(ids, shift_labels=targets)
        expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        torch.testing.assert_close(out.loss, expected.to(out.loss.dtype), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------
def test_auto_classes_are_registered(tiny_config):
    config = tiny_config()
    assert type(AutoConfig.for_model("longlm")) is LongLMConfig
    assert type(AutoModel.from_config(config)) is LongLMModel
    assert type(AutoModelForCausalLM.from_config(config)) is LongLMForCausalLM


@pytest.mark.parametrize("preset", ["transformer-xl", "full"])
def test_save_pretrained_then_auto_from_pretrained(tiny_config, tmp_path, preset):
    config = tiny_config(preset, mixer=["relative", "full"]) if preset == "transformer-xl" else tiny_config(preset)
    model = _model(config, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    ids = _ids(config, 2, SEG)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LongLMForCausalLM
    assert loaded.config.mixers == config.mixers
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        expected = model(ids)
        got = loaded(ids)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
        if expected.memory is not None:
            torch.testing.assert_close(
                loaded(ids, memory=got.memory).logits, model(ids, memory=expected.memory).logits, rtol=0, atol=0
            )
        # the bare model loads from the same folder and gives the hidden states under the head
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is LongLMModel
        torch.testing.assert_close(model.lm_head(base(ids).last_hidden_state), expected.logits, rtol=0, atol=0)
    assert type(AutoConfig.from_pretrained(tmp_path)) is LongLMConfig


def test_trust_remote_code_loads_without_longlm(tiny_config, tmp_path):
    config = tiny_config()
    model = _model(config, dtype=torch.float32)
    save_dir = tmp_path / "model"
    model.save_pretrained(save_dir)
    written = sorted(p.name for p in save_dir.glob("*.py"))
    assert "modeling_longlm.py" in written and "configuration_longlm.py" in written
    assert not any(name.startswith(("training", "data")) for name in written)
    assert json.loads((save_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_longlm.LongLMForCausalLM"
    )
    ids_a, ids_b = _ids(config, 2, SEG), _ids(config, 2, SEG)
    with torch.no_grad():
        out_a = model(ids_a)
        out_b = model(ids_b, memory=out_a.memory)
    outputs = run_remote(save_dir, [ids_a, ids_b], tmp_path)
    torch.testing.assert_close(outputs["logits"][0], out_a.logits, rtol=0, atol=0)
    torch.testing.assert_close(outputs["logits"][1], out_b.logits, rtol=0, atol=0)
    torch.testing.assert_close(outputs["resaved_first_logits"], out_a.logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------
def _greedy_by_hand(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def _greedy_without_context(model, ids, steps):
    """What a generate that lost the context would produce: each step sees only the newest token."""
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids[:, -1:]).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def _spy_forward(model):
    calls = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((ids.shape[1], kwargs.get("memory")))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("preset, overrides", [("transformer-xl", {"mem_len": 32}), ("full", {})])
def test_greedy_generate_equals_manual_loop(tiny_config, preset, overrides):
    # untied head: with tied embeddings a tiny random model mostly repeats its last token, whatever the context
    config = tiny_config(preset, eos_token_id=None, tie_word_embeddings=False, **overrides)
    model = _model(config)
    prompt = _ids(config, 2, 5)
    expected = _greedy_by_hand(model, prompt, 8)
    assert expected.tolist() != _greedy_without_context(model, prompt, 8).tolist()  # the context matters
    calls = _spy_forward(model)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.tolist() == expected.tolist()
    assert len(calls) == 8
    lengths = [length for length, _ in calls]
    # xl: the memory is the cache; full: a key/value cache. After the prompt each step feeds one token
    assert lengths == [5] + [1] * 7
    assert calls[0][1] is None
    assert all(memory is not None and memory.num_tokens == 5 + step for step, (_, memory) in enumerate(calls[1:]))
    if config.memory != "xl":
        assert all(isinstance(memory, KVCacheState) for _, memory in calls[1:])


def test_generate_with_xl_and_mem_len_zero_feeds_whole_sequence(tiny_config):
    """An xl memory with mem_len=0 holds nothing, so generate must not feed only the newest token."""
    config = tiny_config(mem_len=0, eos_token_id=None, tie_word_embeddings=False)
    model = _model(config)
    prompt = _ids(config, 2, 5)
    expected = _greedy_by_hand(model, prompt, 6)
    assert expected.tolist() != _greedy_without_context(model, prompt, 6).tolist()
    calls = _spy_forward(model)
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.tolist() == expected.tolist()
    assert [length for length, _ in calls] == list(range(5, 11))


def test_generate_with_left_padding_equals_unpadded_rows(tiny_config):
    config = tiny_config(mem_len=32, eos_token_id=None, tie_word_embeddings=False)
    model = _model(config)
    prompt = _ids(config, 2, 5)
    attention_mask = torch.ones(2, 5, dtype=torch.long)
    attention_mask[0, :2] = 0
    padded = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    row0 = model.generate(prompt[:1, 2:], max_new_tokens=6, do_sample=False)
    row1 = model.generate(prompt[1:], max_new_tokens=6, do_sample=False)
    assert padded[0, 5:].tolist() == row0[0, 3:].tolist()
    assert padded[1].tolist() == row1[0].tolist()


def test_beam_search_with_memory_equals_beam_search_without(tiny_config, monkeypatch):
    config = tiny_config(mem_len=32, eos_token_id=None, tie_word_embeddings=False)
    model = _model(config)
    prompt = _ids(config, 2, 5)
    with_memory = model.generate(prompt, max_new_tokens=8, do_sample=False, num_beams=3)
    monkeypatch.setattr(type(model.model.memory), "carries_context", property(lambda self: False))
    without_memory = model.generate(prompt, max_new_tokens=8, do_sample=False, num_beams=3)
    assert with_memory.tolist() == without_memory.tolist()


# --------------------------------------------------------------------------------------------------
# gradient checkpointing
# --------------------------------------------------------------------------------------------------
def _grads(model, ids, labels, memory):
    model.zero_grad()
    torch.manual_seed(1234)
    out = model(ids, memory=memory, labels=labels)
    out.loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset, overrides", [("transformer-xl", {}), ("full", {"memory": "xl"})])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_same_gradients(tiny_config, monkeypatch, preset, overrides, dropout):
    config = tiny_config(preset, hidden_dropout_prob=dropout, **overrides)
    model = _model(config).train()
    ids, labels = _ids(config, 2, SEG), _ids(config, 2, SEG)
    with torch.no_grad():
        memory = model(_ids(config, 2, SEG)).memory
    plain = _grads(model, ids, labels, memory)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    block_calls = []
    block_forward = LongLMBlock.forward

    def counting_forward(self, *args, **kwargs):
        block_calls.append(self)
        return block_forward(self, *args, **kwargs)

    monkeypatch.setattr(LongLMBlock, "forward", counting_forward)
    checkpointed = _grads(model, ids, labels, memory)
    # each block ran in the forward and again in the backward: checkpointing is really on
    assert len(block_calls) == 2 * config.num_hidden_layers

    assert plain.keys() == checkpointed.keys()
    assert len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
