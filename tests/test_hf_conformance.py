"""Hugging Face habits, for every preset: in the spirit of transformers' `ModelTesterMixin` and
`GenerationTesterMixin` (outputs, return_dict, hidden states, Trainer, checkpointing, dtypes, beam search,
beam sampling, continuing from a returned memory, the text-generation pipeline)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from longlm import LongLMForCausalLM
from longlm.layers.block import LongLMBlock
from longlm.modeling_longlm import generated_memory
from tests.presets_tiny import PRESET_NAMES, tiny_preset_config
from tests.sentences import raises_naming

VOCAB = 97


def _model(name: str, **overrides) -> LongLMForCausalLM:
    # untied head: a tiny random model with tied embeddings mostly repeats its last token whatever the context
    config = tiny_preset_config(name, vocab_size=VOCAB, eos_token_id=None, tie_word_embeddings=False, **overrides)
    return LongLMForCausalLM(config).eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_return_dict_false_gives_the_same_values_as_a_tuple(name):
    model = _model(name)
    ids = _ids(2, 16)
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        model.config.return_dict = False
        from_config = model(ids, labels=ids)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)
    torch.testing.assert_close(from_config[1], as_dict.logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_output_attentions_is_refused_in_one_sentence_not_ignored(name):
    """(Setting it on the config is refused by transformers itself under the sdpa attention implementation.)"""
    model = _model(name)
    with pytest.raises(ValueError, match=r"^output_attentions=True is not available: [^\n]*\.$"):
        model(_ids(1, 8), output_attentions=True)
    with pytest.raises(ValueError, match=r"^output_attentions=True is not available"):
        model.generate(_ids(1, 8), max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_generate_returns_hidden_states_per_step(name):
    """`prepare_inputs_for_generation` forwards generate's output switches: one tuple of layer states per step."""
    model = _model(name)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_hidden_states=True, return_dict_in_generate=True)
    if model.config.reversible:
        with pytest.raises(ValueError, match="output_hidden_states is not available with reversible=True"):
            model.generate(_ids(2, 6), **kwargs)
        return
    out = model.generate(_ids(2, 6), **kwargs)
    assert len(out.hidden_states) == 4
    assert all(len(step) == model.config.num_hidden_layers + 1 for step in out.hidden_states)
    assert all(step[-1].shape[0] == 2 and step[-1].shape[-1] == model.config.hidden_size for step in out.hidden_states)
    # the last layer's state at each step gives that step's greedy token
    for step, token in zip(out.hidden_states, out.sequences[:, 6:].T):
        torch.testing.assert_close(model.lm_head(step[-1][:, -1]).argmax(-1), token, rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_use_cache_false_rereads_the_whole_sequence_and_gives_the_same_greedy_tokens(name):
    """use_cache=False is one forward over everything at each step: the training-time forward."""
    model = _model(name)
    assert model.config.use_cache is True and "use_cache" in model.config.to_dict()
    ids = _ids(2, 6)
    with_cache = model.generate(ids, max_new_tokens=5, do_sample=False)
    without = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    torch.testing.assert_close(without, with_cache, rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_config_output_hidden_states_is_honoured(name):
    model = _model(name)
    ids = _ids(2, 16)
    model.config.output_hidden_states = True
    if model.config.reversible:
        with pytest.raises(ValueError, match=r"^output_hidden_states is not available with reversible=True[^\n]*\.$"):
            model(ids)
        return
    with torch.no_grad():
        out = model(ids)
        explicit_off = model(ids, output_hidden_states=False)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 16, model.config.hidden_size) for h in out.hidden_states)  # the tokens only
    assert explicit_off.hidden_states is None


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_trainer_evaluate_reports_eval_loss_with_default_arguments(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model(name)
    rows = [{"input_ids": _ids(1, 16, seed)[0], "labels": _ids(1, 16, seed)[0]} for seed in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = Trainer(model=model, args=args, eval_dataset=rows).evaluate()
    assert "eval_loss" in metrics
    with torch.no_grad():
        batches = [torch.stack([r["input_ids"] for r in rows[i : i + 2]]) for i in (0, 2)]
        expected = sum(model(b, labels=b).loss.item() for b in batches) / 2
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def _rows_of_unequal_targets(count: int, length: int) -> list[dict[str, torch.Tensor]]:
    """Rows whose labels ignore (-100) all but the first 8..length tokens: accumulated batches hold unequal
    target counts (no padding: the compressive memory refuses padded batches)."""
    rows = []
    for index in range(count):
        targets = 8 + (index * 5) % (length - 7)
        ids = _ids(1, length, seed=index)[0]
        rows.append({"input_ids": ids, "labels": ids.masked_fill(torch.arange(length) >= targets, -100)})
    return rows


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_trainer_gradient_accumulation_equals_one_large_batch(name, tmp_path):
    """Two batches of 2 accumulated take the step one batch of 4 takes (the Trainer passes
    num_items_in_batch to a forward with **kwargs and then does not divide the loss itself)."""
    from transformers import Trainer, TrainingArguments

    rows = _rows_of_unequal_targets(4, 16)
    after = {}
    for batch, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = _model(name).train()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch}x{accumulate}"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True,
            save_strategy="no", dataloader_drop_last=False, seed=0, data_seed=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=model, args=args, train_dataset=rows)
            trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
            trainer.train()
        after[batch] = {key: value.detach().clone() for key, value in model.named_parameters()}
    torch.manual_seed(0)
    start = dict(_model(name).named_parameters())
    moved = max((after[4][key] - start[key]).abs().max().item() for key in start)
    assert moved > 1e-4  # the step did something
    for key in start:
        torch.testing.assert_close(after[2][key], after[4][key], rtol=1e-4, atol=1e-6, msg=key)


HEADS = ("LongLMForCausalLM", "LongLMForMaskedLM", "LongLMForQuestionAnswering")


@pytest.mark.parametrize("head", HEADS)
def test_every_head_takes_the_backbone_inputs_and_refuses_a_misspelt_one(head):
    import inspect

    import longlm
    from longlm.head_inputs import BACKBONE_INPUTS

    cls = getattr(longlm, head)
    parameters = inspect.signature(cls.forward).parameters
    assert list(parameters)[:3] == ["self", "input_ids", "attention_mask"]
    assert set(BACKBONE_INPUTS) <= set(parameters)  # the Trainer keeps these dataset columns
    decoder = head == "LongLMForCausalLM"
    config = tiny_preset_config("bigbird" if not decoder else "rmt", vocab_size=VOCAB, is_decoder=decoder, sep_token_id=4)
    model = cls(config).eval()
    ids = _ids(1, 12)
    ids[0, 3] = 4
    raises_naming(lambda: model(ids, documnet_starts=torch.zeros_like(ids)), head, "documnet_starts", error=TypeError)
    with torch.no_grad():
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[0, 6] = True
        plain, split = model(ids), model(ids, document_starts=starts)
    first = plain.logits if hasattr(plain, "logits") else plain.start_logits
    second = split.logits if hasattr(split, "logits") else split.start_logits
    assert not torch.allclose(first[:, 6:], second[:, 6:])  # the input reached the backbone


# --------------------------------------------------------------------------------------------------
# gradient checkpointing and dtypes
# --------------------------------------------------------------------------------------------------
def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(name, use_reentrant, monkeypatch):
    model = _model(name).train()
    ids = _ids(2, 16)
    if model.config.reversible:
        with pytest.raises(ValueError, match=r"^Gradient checkpointing does not apply to reversible=True[^\n]*\.$"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        return
    torch.manual_seed(0)
    plain = _grads(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    forward = LongLMBlock.forward
    monkeypatch.setattr(LongLMBlock, "forward", lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    model.load_state_dict(state)  # buffers a training step moves (routing's centroids) start where they did
    torch.manual_seed(0)
    checkpointed = _grads(model, ids)
    assert len(calls) == 2 * model.config.num_hidden_layers  # each block reran in backward: checkpointing is on
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for key, value in model.state_dict().items():  # side effects (centroid updates) applied once, not twice
        if key.endswith("centroids"):
            model_once = _model(name).train()
            model_once.load_state_dict(state)
            torch.manual_seed(0)
            _grads(model_once, ids)
            torch.testing.assert_close(value, model_once.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_bfloat16_forward_and_backward(name):
    model = _model(name).train().to(torch.bfloat16)
    ids = _ids(2, 16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_fresh_weights_are_initialised_even_on_the_meta_device(name):
    """`from_config` under HF's meta-device init leaves no buffer or parameter uninitialised (routing's
    centroids are unit vectors)."""
    from transformers import AutoModelForCausalLM

    config = tiny_preset_config(name, vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_config(config)
    for key, value in model.state_dict().items():
        assert torch.isfinite(value.float()).all(), key
        if key.endswith("centroids"):
            torch.testing.assert_close(value.norm(dim=-1), torch.ones(value.shape[:-1]))


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def _sequence_log_prob(model, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Sum of log p(token | everything before it) over the generated tokens, from one forward."""
    with torch.no_grad():
        log_probs = F.log_softmax(model(sequences).logits.float(), dim=-1)
    picked = log_probs[:, prompt_length - 1 : -1].gather(-1, sequences[:, prompt_length:, None])[..., 0]
    return picked.sum(-1)




@pytest.mark.parametrize("do_sample", [False, True], ids=["beam-search", "beam-sampling"])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_beam_scores_equal_the_forward_log_probabilities(name, do_sample):
    """Each returned beam's score is the log-probability one forward gives its tokens: the memory followed
    the beams (reordered with them) and no step saw another beam's context."""
    model = _model(name)
    prompt = _ids(2, 8)
    torch.manual_seed(0)
    extra = dict(top_k=0, top_p=1.0, temperature=1.0) if do_sample else {}
    out = model.generate(
        prompt, max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=do_sample,
        length_penalty=0.0, output_scores=True, return_dict_in_generate=True, pad_token_id=0, **extra,
    )
    assert out.sequences.shape == (4, 14)
    assert torch.equal(out.sequences[:, :8], prompt.repeat_interleave(2, dim=0))
    torch.testing.assert_close(out.sequences_scores, _sequence_log_prob(model, out.sequences, 8), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_generation_continues_from_a_returned_memory(name):
    model = _model(name)
    prompt = _ids(2, 6)
    with torch.no_grad():
        once = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        first = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        memory = generated_memory(first)
        # the mask says every token is real: generate would otherwise take a generated pad_token_id for padding
        real = torch.ones_like(first.sequences)
        resumed = model.generate(
            first.sequences, attention_mask=real, memory=memory, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert resumed.tolist() == once.tolist()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_text_generation_pipeline_with_beams(name):
    from transformers import ByT5Tokenizer, pipeline

    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = tiny_preset_config(name, vocab_size=259, eos_token_id=None, tie_word_embeddings=False)
    model = LongLMForCausalLM(config).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    out = generator("It is a truth", return_tensors=True, **options)
    ids = tokenizer("It is a truth", return_tensors="pt").input_ids  # as the pipeline encodes it (ByT5 appends </s>)
    expected = model.generate(ids, **options)
    assert list(out[0]["generated_token_ids"]) == expected[0].tolist()  # random bytes need not decode: compare ids


# --------------------------------------------------------------------------------------------------
# generate() equals the training-time forward
# --------------------------------------------------------------------------------------------------
def _within_span(name: str) -> dict:
    """mem_len 64 for the presets with an XL cache, so it holds every token of these tests."""
    return {"mem_len": 64} if tiny_preset_config(name).mem_len else {}


def _step_logits(model, sequence: torch.Tensor, new_tokens: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy tokens, the logits generate() computed at each step), stacked as (B, new_tokens, V)."""
    out = model.generate(sequence, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_generate_logits_equal_one_forward_over_prompt_and_generated_tokens(name):
    """Greedy generate(): the logits of every step equal those of one forward over prompt + generated tokens
    (one segment), within the memory span (mem_len 64, where there is one, holds all 16 tokens). Memorizing: the tokens of the
    segment being generated are attended through the XL cache only, never also retrieved from the kNN store."""
    model = _model(name, **_within_span(name))
    prompt, new = _ids(2, 6, seed=3), 10
    with torch.no_grad():
        sequences, logits = _step_logits(model, prompt, new)
        forward = model(sequences[:, :-1]).logits[:, prompt.shape[1] - 1:]
    torch.testing.assert_close(logits, forward, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if LongLMForCausalLM(tiny_preset_config(n, vocab_size=VOCAB)).model.memory.carries_context])
def test_generate_after_a_memory_equals_one_forward_after_that_memory(name):
    """The same after an earlier segment whose memory (XL cache, kNN store) is passed to generate: the
    sequence so far is earlier + prompt, the memory has absorbed the earlier part."""
    model = _model(name, **_within_span(name))
    earlier, prompt, new = _ids(2, 8, seed=4), _ids(2, 6, seed=5), 10
    with torch.no_grad():
        memory = model(earlier).memory
        sequences, logits = _step_logits(model, torch.cat([earlier, prompt], dim=1), new, memory=memory)
        generated = sequences[:, earlier.shape[1]:]
        forward = model(generated[:, :-1], memory=memory).logits[:, prompt.shape[1] - 1:]
    torch.testing.assert_close(logits, forward, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# save / load, batching, left padding, training (ModelTesterMixin / GenerationTesterMixin's checks)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_save_and_auto_from_pretrained_give_the_same_model(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(name)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    fields = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert type(loaded) is LongLMForCausalLM and fields(loaded) == fields(model)
    first, second = _ids(2, 16, seed=6), _ids(2, 16, seed=7)
    with torch.no_grad():
        ours, theirs = model(first), loaded(first)
        torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=0)
        after = lambda m, out: m(second, memory=out.memory).logits  # noqa: E731  the memory it writes, too
        torch.testing.assert_close(after(loaded, theirs), after(model, ours), rtol=0, atol=0)
        options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert loaded.generate(first, **options).tolist() == model.generate(first, **options).tolist()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_batching_equivalence(name):
    """Rows of a batch never see each other: each row of a batch of 3 gets what it gets alone, in this segment
    and in the next one (the memory it wrote)."""
    model = _model(name)
    first, second = _ids(3, 16, seed=8), _ids(3, 16, seed=9)
    with torch.no_grad():
        batched = model(first)
        batched_next = model(second, memory=batched.memory).logits
        for row in range(3):
            alone = model(first[row : row + 1])
            torch.testing.assert_close(batched.logits[row], alone.logits[0], rtol=0, atol=1e-5)
            alone_next = model(second[row : row + 1], memory=alone.memory).logits
            torch.testing.assert_close(batched_next[row], alone_next[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_left_padding_compatibility_in_generate(name):
    """A left-padded prompt row generates, step by step, what the row alone generates (the presets that
    cannot pad exactly refuse in one sentence instead)."""
    from tests.sentences import assert_one_sentence

    model = _model(name)
    prompt = _ids(2, 9, seed=10)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    padded_prompt = prompt.masked_fill(mask == 0, 0)
    with torch.no_grad():
        if name == "compressive":
            with pytest.raises(ValueError) as info:
                _step_logits(model, padded_prompt, 6, attention_mask=mask)
            assert "padding" in str(info.value)
            assert_one_sentence(str(info.value))
            return
        sequences, logits = _step_logits(model, padded_prompt, 6, attention_mask=mask)
        alone_sequences, alone_logits = _step_logits(model, prompt[:1, 4:], 6)
    assert sequences[0, 9:].tolist() == alone_sequences[0, 5:].tolist()
    torch.testing.assert_close(logits[0], alone_logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_training_gives_every_parameter_a_finite_gradient_and_lowers_the_loss(name):
    """A segment after a memory, with a global token: every parameter takes part (the kNN gate once the store
    holds something, Longformer's global projections once a token is global)."""
    model = _model(name).train()
    earlier, ids = _ids(2, 32, seed=12), _ids(2, 32, seed=11)
    global_mask = torch.zeros_like(ids)
    global_mask[:, 0] = 1
    with torch.no_grad():
        memory = model(earlier).memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(3):
        optimizer.zero_grad()
        loss = model(ids, labels=ids, memory=memory, global_attention_mask=global_mask).loss
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
            assert not missing, f"{name}: no finite gradient for {missing}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{name}: {losses}"
