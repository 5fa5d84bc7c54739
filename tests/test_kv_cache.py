"""generate()'s key/value cache (`longlm.attention.kv_cache`): the presets whose memory and mixers allow it
feed one token per step and still give, at every step, what one forward over prompt + generated tokens
gives — with left padding, document starts in the prompt, beams, and a rolling window that never holds
more than the window."""
from __future__ import annotations

import pytest
import torch

from longlm import LongLMForCausalLM
from longlm.attention.kv_cache import KVCacheState
from longlm.modeling_longlm import generated_memory
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.sentences import raises_naming

CACHED = [name for name in PRESET_NAMES if LongLMForCausalLM(tiny_preset_config(name)).model.supports_kv_cache]
NEW = 24  # generated tokens: several windows past the tiny presets' attention_window


def _model(name: str) -> LongLMForCausalLM:
    torch.manual_seed(0)
    return LongLMForCausalLM(tiny_preset_config(name, initializer_range=0.1)).double().eval()


def _prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the first left-padded by 5, with a document start 4 tokens before the prompt ends."""
    torch.manual_seed(1)
    ids = torch.randint(3, 259, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 26] = True
    return ids, mask, starts


def test_the_presets_without_segment_state_and_with_a_cacheable_pattern_cache():
    assert CACHED == ["bigbird", "full", "longformer", "reformer", "routing"]


@pytest.mark.parametrize("name", CACHED)
def test_every_step_equals_one_forward_over_the_whole_sequence(name):
    model = _model(name)
    ids, mask, starts = _prompt()
    fed = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, document_starts=starts, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
        hook.remove()
        full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=torch.long)], dim=1)
        full_starts = torch.cat([starts, torch.zeros(2, NEW, dtype=torch.bool)], dim=1)
        forward = model(out.sequences, attention_mask=full_mask, document_starts=full_starts).logits
    assert fed == [30] + [1] * (NEW - 1), "after the prompt every step feeds one token"
    steps = torch.stack(out.logits, dim=1).double()
    torch.testing.assert_close(steps[0], forward[0, 29:-1], rtol=0, atol=1e-5)  # generate's logits are float32
    torch.testing.assert_close(steps[1], forward[1, 29:-1], rtol=0, atol=1e-5)
    assert isinstance(generated_memory(out), KVCacheState)


@pytest.mark.parametrize("name", CACHED)
def test_cached_and_uncached_generation_agree_with_beams_and_sampling(name):
    model = _model(name)
    ids = _prompt()[0][1:]
    with torch.no_grad():
        for options in (dict(num_beams=3, do_sample=False), dict(num_beams=3, do_sample=True, num_return_sequences=2)):
            results = []
            for use_cache in (True, False):
                torch.manual_seed(2)
                results.append(model.generate(ids, max_new_tokens=10, pad_token_id=0, use_cache=use_cache, **options))
            assert torch.equal(*results), options


def test_the_rolling_window_cache_never_holds_more_than_the_window():
    model = _model("longformer")
    with torch.no_grad():
        out = model.generate(_prompt()[0], max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = generated_memory(out)
    reach = model.config.attention_window // 2 + 1  # the keys a causal query can still attend, itself included
    assert [keys.shape[2] for keys in cache.keys] == [reach] * model.config.num_hidden_layers
    assert cache.num_tokens == out.sequences.shape[1] - 1  # every token but the last generated one was fed


def test_the_full_cache_holds_every_earlier_token():
    model = _model("full")
    with torch.no_grad():
        out = model.generate(_prompt()[0], max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert [keys.shape[2] for keys in generated_memory(out).keys] == [out.sequences.shape[1] - 1] * 2


@pytest.mark.parametrize("name", sorted(set(PRESET_NAMES) - set(CACHED)))
def test_a_model_that_cannot_cache_refuses_a_key_value_cache_in_one_sentence(name):
    cached = _model("full")
    with torch.no_grad():
        cache = cached(torch.randint(3, 259, (1, 8)), use_cache=True).memory
    model = _model(name)
    raises_naming(lambda: model(torch.randint(3, 259, (1, 4)), memory=cache), "KVCacheState")


@pytest.mark.parametrize("name", CACHED)
def test_use_cache_in_a_plain_forward_returns_a_cache_that_continues_it(name):
    model = _model(name)
    ids = torch.randint(3, 259, (2, 40))
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :25], use_cache=True)
        second = model(ids[:, 25:], memory=first.memory)
    # float64 models; reformer's fused chunk kernel computes in float32
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole, rtol=0, atol=1e-6)
