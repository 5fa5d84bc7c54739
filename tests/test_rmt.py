"""`rmt` (Recurrent Memory Transformer): memory tokens read/written per segment, BPTT over k segments."""
from __future__ import annotations


import lightning as L
import numpy as np
import pytest
import torch
import yaml

from tests.remote_code_check import run_remote
from longlm import LongLMConfig, LongLMForCausalLM
from longlm.data.streams import SegmentStreams
from longlm.memory.rmt import RMTMemoryState
from longlm.training import CausalLMPretraining, LMDataModule
from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0, mem_len=0)
MIXERS = {"relative": dict(mixer="relative", position_embedding_type="none"), "full": dict(mixer="full", position_embedding_type="rotary")}
SEG = 12


def _config(mixer="relative", **overrides) -> LongLMConfig:
    return LongLMConfig.from_preset("rmt", **{**TINY, "num_memory_tokens": 4, **MIXERS[mixer], **overrides})


def _model(mixer="relative", **overrides) -> LongLMForCausalLM:
    return LongLMForCausalLM(_config(mixer, **overrides)).eval()


def _ids(batch=2, length=SEG, seed=0):
    return torch.randint(2, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", MIXERS)
def test_zero_memory_tokens_is_exactly_the_plain_model(mixer):
    plain = LongLMForCausalLM(LongLMConfig.from_preset("rmt", **{**TINY, **MIXERS[mixer], "memory": "none"})).eval()
    rmt = _model(mixer, num_memory_tokens=0)
    rmt.load_state_dict(plain.state_dict())  # strict: zero memory tokens add no parameter
    ids = _ids()
    with torch.no_grad():
        out = rmt(ids)
        assert out.memory is None
        torch.testing.assert_close(out.logits, plain(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_segment_tokens_are_causal_with_memory(mixer):
    model = _model(mixer)
    with torch.no_grad():
        memory = model(_ids(seed=1)).memory
        ids = _ids()
        base = model(ids, memory=memory).logits
        for t in (0, 5, SEG - 1):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % 259
            logits = model(changed, memory=memory).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.equal(logits[:, t:], base[:, t:])


@pytest.mark.parametrize("mixer", MIXERS)
def test_memory_carries_from_segment_to_segment(mixer):
    """Segment 2's output depends on segment 1's content only through the memory written after segment 1."""
    model = _model(mixer)
    second = _ids(seed=2)
    with torch.no_grad():
        mem_a, mem_b = model(_ids(seed=3)).memory, model(_ids(seed=4)).memory
        assert isinstance(mem_a, RMTMemoryState) and mem_a.memory.shape == (2, 4, 32)
        out_a, out_b = model(second, memory=mem_a), model(second, memory=mem_b)
        fresh = model(second)
    assert not torch.allclose(out_a.logits, out_b.logits)
    assert not torch.allclose(out_a.logits, fresh.logits)
    # and again one segment further: segment 3 still sees segment 1 through the chain of memories
    with torch.no_grad():
        third_a = model(_ids(seed=5), memory=out_a.memory).logits
        third_b = model(_ids(seed=5), memory=out_b.memory).logits
    assert not torch.allclose(third_a, third_b)


def test_written_memory_keeps_its_graph():
    model = _model().train()
    assert model(_ids()).memory.memory.requires_grad


def test_reset_rows_resets_only_the_asked_rows():
    model = _model()
    with torch.no_grad():
        memory = model(_ids(seed=1)).memory
        ids = _ids()
        carried = model(ids, memory=memory).logits
        fresh = model(ids).logits
        reset = model(ids, memory=memory.reset_rows(torch.tensor([True, False]))).logits
    torch.testing.assert_close(reset[0], fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(reset[1], carried[1], rtol=0, atol=0)
    assert not torch.allclose(carried[0], fresh[0])


def test_encoder_reads_and_writes_memory_at_the_start():
    model = _model(is_decoder=False)
    with torch.no_grad():
        first = model(_ids(seed=1))
        assert first.logits.shape == (2, SEG, 259)
        out_a = model(_ids(), memory=first.memory).logits
        out_b = model(_ids(), memory=model(_ids(seed=6)).memory).logits
    assert not torch.allclose(out_a, out_b)


def _run_segments(seed):
    torch.manual_seed(seed)
    model = LongLMForCausalLM(_config(hidden_dropout_prob=0.1)).train()
    memory, losses = None, []
    for index in range(3):
        ids = _ids(seed=10 + index)
        out = model(ids, memory=memory, labels=ids)
        losses.append(out.loss)
        memory = out.memory
    sum(losses).backward()
    return torch.stack(losses).detach(), [p.grad.clone() for p in model.parameters()]


def test_two_identical_runs_are_identical():
    losses_a, grads_a = _run_segments(0)
    losses_b, grads_b = _run_segments(0)
    assert torch.equal(losses_a, losses_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_every_parameter_receives_a_gradient():
    model = LongLMForCausalLM(_config()).train()
    memory, loss = None, 0.0
    for index in range(2):
        ids = _ids(seed=20 + index)
        out = model(ids, memory=memory, labels=ids)
        loss, memory = loss + out.loss, out.memory
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert model.model.memory.initial.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_memory_tokens=-1), r"num_memory_tokens must be a non-negative integer, got -1\."),
        (dict(bptt_depth=0), r"bptt_depth must be a positive integer .*got 0\."),
        (dict(mem_len=16), r"does not combine with a cache of past states; set mem_len=0 \(got 16\)\."),
    ],
)
def test_bad_config_says_which_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_save_and_from_pretrained_give_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        first, first_loaded = model(ids), loaded(ids)
        torch.testing.assert_close(first_loaded.logits, first.logits, rtol=0, atol=0)
        torch.testing.assert_close(
            loaded(ids, memory=first_loaded.memory).logits, model(ids, memory=first.memory).logits, rtol=0, atol=0
        )


def test_trust_remote_code_loads_without_longlm(tmp_path):
    model = _model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / "memory_rmt.py").exists()
    ids_a, ids_b = _ids(seed=1), _ids(seed=2)
    with torch.no_grad():
        expected = model(ids_b, memory=model(ids_a).memory).logits
    outputs = run_remote(folder, [ids_a, ids_b], tmp_path)
    torch.testing.assert_close(outputs["logits"][1], expected, rtol=0, atol=0)


def _greedy_by_hand(model, ids, steps, memory=None):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, memory=memory).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_reads_the_carried_memory_at_every_step(mixer):
    model = _model(mixer)
    prompt, steps = _ids(length=6), 4
    with torch.no_grad():
        written = model(_ids(seed=9)).memory  # the memory after forwarding an earlier segment
    for memory in (written, None):
        out = model.generate(
            prompt, memory=memory, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert out.sequences.tolist() == _greedy_by_hand(model, prompt, steps, memory).tolist()
        with torch.no_grad():
            for step, logits in enumerate(out.logits):
                seen = out.sequences[:, : prompt.shape[1] + step]
                torch.testing.assert_close(logits, model(seen, memory=memory).logits[:, -1])
                if memory is not None:  # the memory is really read, at every step
                    assert not torch.allclose(logits, model(seen).logits[:, -1])


# --------------------------------------------------------------------------------------------------
# training: BPTT through bptt_depth segments
# --------------------------------------------------------------------------------------------------
def _segments(count, batch=2, seg=SEG):
    tokens = np.random.default_rng(0).integers(2, 259, size=batch * (count * seg + 1))
    streams = SegmentStreams(tokens, batch, seg)
    return [streams.segment(i) for i in range(count)]


def test_gradient_reaches_segment_t_minus_k_plus_1_and_not_t_minus_k():
    """k = 2: the loss of segment t=3 reaches segment 2 through the memory, but not segment 1, which the
    previous step's window held (its memory was detached when that step ended)."""
    module = CausalLMPretraining("rmt", config={**TINY, "num_memory_tokens": 4, "bptt_depth": 2}, vocab_size=259)
    module.train()
    k = module.model.config.bptt_depth
    embeddings = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        embeddings.append(output)

    module.model.model.embed_tokens.register_forward_hook(keep)
    segments = _segments(4)
    _, memory = module.forward_segments(segments[:k], None)
    assert not memory.memory.requires_grad  # the memory carried to the next step is detached
    outs, _ = module.forward_segments(segments[k:], memory)
    outs[-1].lm_loss.backward()  # the loss of segment t = 3 alone
    t = 3
    assert embeddings[t].grad.abs().sum() > 0
    assert embeddings[t - k + 1].grad is not None and embeddings[t - k + 1].grad.abs().sum() > 0
    assert embeddings[t - k].grad is None and embeddings[0].grad is None


def test_depth_one_keeps_no_graph_across_segments():
    module = CausalLMPretraining("rmt", config={**TINY, "num_memory_tokens": 4, "bptt_depth": 1}, vocab_size=259)
    _, memory = module.forward_segments(_segments(1), None)
    assert not memory.memory.requires_grad


class WindowRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.segments: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.segments.append([int(b["segment"]) for b in batch])


def _fit(tmp_path, max_steps, *, ckpt_path=None, every=None):
    L.seed_everything(7)
    data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=4, tgt_len=16, cache_dir=str(tmp_path / "cache"))
    config = {**TINY, "num_memory_tokens": 4, "bptt_depth": 2, "hidden_dropout_prob": 0.1}
    module = CausalLMPretraining("rmt", config=config, vocab_size=data.vocab_size, learning_rate=3e-3, warmup_steps=2)
    recorder = WindowRecorder()
    callbacks = [recorder]
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(every), gradient_clip_val=0.25,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, recorder


@requires_shared_data
def test_fit_with_bptt_depth_two_then_exact_resume(tmp_path):
    module, uninterrupted = _fit(tmp_path / "a", 4, every=2)
    assert uninterrupted.segments == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert module.next_train_segment == 8 and not module.train_memory.memory.requires_grad
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt"
    assert torch.load(ckpt, weights_only=True)["longlm"]["next_train_segment"] == 4
    _, resumed = _fit(tmp_path / "b", 4, ckpt_path=str(ckpt))
    assert resumed.segments == uninterrupted.segments[2:]
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], abs=1e-6)


@pytest.mark.parametrize("dataset", ["enwik8", "pg19"])
def test_tiny_configs_describe_an_rmt(dataset):
    recipe = yaml.safe_load((REPO / "configs" / dataset / "rmt-tiny.yaml").read_text())
    config = LongLMConfig.from_preset(recipe["model"]["preset"], **recipe["model"]["config"])
    assert (config.memory, config.num_memory_tokens, config.bptt_depth, config.hidden_size) == ("rmt", 8, 2, 128)


@requires_shared_data
def test_pretrain_script_with_the_tiny_config_exports_a_folder_evaluate_reads(tmp_path):
    from tests.test_training import _evaluate, _pretrain

    root = tmp_path / "run"
    _pretrain(
        "enwik8/rmt-tiny.yaml", ENWIK8_SAMPLE, tmp_path,
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
        "--data.batch_size", "4",
    )
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3 and state["longlm"]["next_train_segment"] == 6
    result = _evaluate(root / "hf", "enwik8", ENWIK8_SAMPLE, tmp_path, "--tgt-len", "64", "--batch-size", "4", "--max-segments", "3")
    assert 0 < result["bits_per_character"] < 9 and result["tokens_scored"] == 3 * 4 * 64
