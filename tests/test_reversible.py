"""Reversible residual blocks and chunked feed-forward layers (the Reformer's skeleton options)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longlm import LongLMConfig, LongLMForCausalLM
from longlm.layers.recompute import is_recomputing
from tests.memory_probe import peak_memory_bytes

SIZE = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=259, memory="none", mem_len=0)


def _config(**overrides) -> LongLMConfig:
    return LongLMConfig.from_preset("full", **{**SIZE, "num_hidden_layers": 3, "reversible": True, **overrides})


def _reference_loss(model: LongLMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The same two-stream network through plain autograd: y1 = x1 + F(x2), y2 = x2 + G(y1), output (y1 + y2) / 2."""
    from longlm.attention.base import MixerInputs

    inner = model.model
    x1 = x2 = inner.dropout(inner.embed_tokens(ids) * inner.embed_scale)
    for layer in inner.layers:
        inputs = MixerInputs(None, None, causal=True)
        x1 = x1 + layer.block.mixer_branch(x2, inputs)
        x2 = x2 + layer.block.feed_forward_branch(x1)
    hidden = inner.dropout(inner.final_norm((x1 + x2) / 2))
    logits = model.lm_head(hidden)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())  # float32, as the model does


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_blocks_give_the_gradients_of_ordinary_two_stream_blocks(dropout):
    model = LongLMForCausalLM(_config(hidden_dropout_prob=dropout)).double().train()
    ids = torch.randint(3, 259, (2, 37))
    torch.manual_seed(5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    reversible = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(5)
    reference = _reference_loss(model, ids)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-7, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(reversible[name], p.grad, rtol=1e-7, atol=1e-9, msg=name)
    assert all(bool(g.abs().sum() > 0) for g in reversible.values())


@pytest.mark.parametrize("how", ["reversible blocks", "HF activation checkpointing"])
def test_recomputation_is_flagged_for_mixers_with_side_effects(how):
    if how == "reversible blocks":
        model = LongLMForCausalLM(_config()).train()
    else:
        model = LongLMForCausalLM(_config(reversible=False)).train()
        model.activation_checkpointing_enable()
    seen: list[bool] = []
    model.model.layers[0].block.mixer.register_forward_hook(lambda *_: seen.append(is_recomputing()))
    ids = torch.randint(3, 259, (1, 16))
    loss = model(ids, labels=ids).loss
    assert seen == [False]
    loss.backward()
    assert seen == [False, True] and not is_recomputing()


def test_activation_memory_does_not_grow_with_depth():
    ids = torch.randint(3, 259, (1, 1024))

    def peak(layers: int, reversible: bool) -> int:
        model = LongLMForCausalLM(_config(num_hidden_layers=layers, reversible=reversible, hidden_dropout_prob=0.0))
        return peak_memory_bytes(lambda: model(ids, labels=ids).loss.backward())

    growth_plain = peak(8, False) - peak(2, False)
    growth_reversible = peak(8, True) - peak(2, True)
    assert growth_reversible < growth_plain / 4, (growth_reversible, growth_plain)


def test_chunked_feed_forward_equals_the_whole_sequence_at_once():
    plain = LongLMForCausalLM(_config(reversible=False)).double().eval()
    chunked = LongLMForCausalLM(_config(reversible=False, feed_forward_chunk_size=7)).double().eval()
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 259, (2, 30))  # 30 = 4 chunks of 7 and one of 2
    torch.testing.assert_close(chunked(ids).logits, plain(ids).logits, rtol=1e-12, atol=1e-12)


def test_reversible_model_saves_reloads_and_generates(tmp_path):
    model = LongLMForCausalLM(_config()).eval()
    model.save_pretrained(tmp_path)
    again = LongLMForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 259, (1, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    out = again.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(pre_norm=False), "reversible=True needs pre_norm=True"),
        (dict(memory="xl", mem_len=8, mixer="relative", position_embedding_type="none"), "reversible=True stores no per-layer activations"),
        (dict(feed_forward_chunk_size=-1), "feed_forward_chunk_size must be a non-negative integer"),
    ],
)
def test_bad_skeleton_options_are_one_clear_sentence(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)
