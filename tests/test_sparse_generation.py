"""Every sparse decoder preset: the output at position t depends only on tokens <= t, so token-by-token
generation (a forward over each prefix) reproduces the logits of one training-time forward over the whole
sequence, at lengths well past each mechanism's window, block plan, bucket chunk and cluster window."""
from __future__ import annotations

import pytest
import torch

from longlm import LongLMConfig, LongLMForCausalLM

SIZE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0)
SPARSE = {
    "longformer": dict(attention_window=8),
    "bigbird": dict(block_size=4, num_random_blocks=1),
    "reformer": dict(num_buckets=4, num_hashes=2, lsh_chunk_length=4),
    "routing": dict(attention_window=8, routing_layers=[1], num_clusters=3, num_routing_heads=2),
}


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_prefix_forwards_reproduce_the_full_forward(name):
    model = LongLMForCausalLM(LongLMConfig.from_preset(name, **SIZE, **SPARSE[name])).double().eval()
    ids = torch.randint(3, 259, (2, 70))
    with torch.no_grad():
        full = model(ids).logits
        for t in range(1, ids.shape[1] + 1, 3):
            prefix = model(ids[:, :t]).logits[:, -1]
            torch.testing.assert_close(prefix, full[:, t - 1], rtol=1e-9, atol=1e-9, msg=f"{name}: position {t - 1}")


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_greedy_generation_equals_the_argmax_of_one_forward(name):
    model = LongLMForCausalLM(LongLMConfig.from_preset(name, **SIZE, **SPARSE[name])).double().eval()
    prompt = torch.randint(3, 259, (1, 40))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        logits = model(generated).logits
    assert generated[0, 40:].tolist() == logits[0, 39:51].argmax(-1).tolist()
