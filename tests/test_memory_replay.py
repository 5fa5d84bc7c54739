"""Memory-replay backpropagation (`CausalLMPretraining(replay_segments=True)`): each segment of a BPTT window
is recomputed in backward from the memory it read, so the gradients equal those of keeping the whole window's
graph, for every preset (dropout on: the rerun replays the forward's draws), and a step's side effects
(k-means centroid updates, LSH bucket stashes) happen once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longlm import LongLMConfig
from longlm.data.streams import SegmentStreams
from longlm.memory import MEMORIES
from longlm.presets import shrunk_preset
from longlm.training.lm_module import CausalLMPretraining
from tests.paths import ENWIK8_SAMPLE, requires_shared_data
from tests.presets_tiny import PRESET_NAMES, SHRINK, SIZE

SEG = 16


def _segments(count: int, batch: int = 2) -> list[dict]:
    tokens = np.random.default_rng(0).integers(2, 259, size=batch * (count * SEG + 1))
    streams = SegmentStreams(tokens, batch, SEG)
    return [streams.segment(i) for i in range(count)]


def _module(name: str, replay: bool, **overrides) -> CausalLMPretraining:
    fields = shrunk_preset(name, dict(SIZE, hidden_dropout_prob=0.1, attention_dropout=0.0), SHRINK, **overrides)
    torch.manual_seed(0)
    module = CausalLMPretraining(name, config=fields, vocab_size=259, replay_segments=replay)
    return module.train()


def _depth(name: str) -> int:
    """3 for a memory that passes gradients between segments, else 1 (the only depth it allows)."""
    config = LongLMConfig.from_preset(name, **shrunk_preset(name, SIZE, SHRINK))
    return 3 if MEMORIES.get(config.memory).backpropagates_through_state else 1


def _train(module: CausalLMPretraining, windows: int = 2):
    """`windows` training steps (backward each, no optimiser step): losses, summed gradients, state after."""
    depth = module.segments_per_step
    segments = _segments(depth * windows)
    torch.manual_seed(1)
    losses = []
    for window in range(windows):
        batch = segments[window * depth : (window + 1) * depth] if depth > 1 else segments[window]
        loss = module.training_step(batch, window)
        loss.backward()
        losses.append(loss.item())
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return losses, grads, {name: value.clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_replayed_segments_give_the_gradients_of_the_kept_graph(name):
    depth = _depth(name)
    kept_losses, kept_grads, kept_state = _train(_module(name, False, bptt_depth=depth))
    replay_losses, replay_grads, replay_state = _train(_module(name, True, bptt_depth=depth))
    assert replay_losses == pytest.approx(kept_losses, rel=1e-6)
    assert kept_grads.keys() == replay_grads.keys() and kept_grads
    for key in kept_grads:
        torch.testing.assert_close(replay_grads[key], kept_grads[key], rtol=1e-5, atol=1e-7, msg=key)
    for key in kept_state:  # buffers updated in training (centroids) move once per segment, not twice
        torch.testing.assert_close(replay_state[key], kept_state[key], rtol=1e-6, atol=1e-7, msg=key)


def test_a_replayed_window_keeps_no_activation_between_segments():
    """With replay the graph between a window's segments holds the memories and losses only: the tensors saved
    for backward outside the recomputation are a few small ones, whatever the depth."""
    saved: dict[int, int] = {}
    for depth in (2, 4):
        module = _module("rmt", True, bptt_depth=depth)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            module.training_step(_segments(depth), 0)
        saved[depth] = total
    kept = _module("rmt", False, bptt_depth=2)
    kept_total = 0

    def count(tensor):
        nonlocal kept_total
        kept_total += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        kept.training_step(_segments(2), 0)
    assert saved[4] < kept_total / 10  # replay at depth 4 keeps a small fraction of what depth 2 keeps otherwise


@requires_shared_data
def test_a_lightning_fit_with_replay_takes_the_steps_of_one_without(tmp_path):
    """Through Trainer.fit (gradient clipping, AdamW, dropout on, bptt_depth 2): the same losses step by step."""
    import lightning as L

    from longlm.training import LMDataModule

    losses = {}
    for replay in (False, True):
        L.seed_everything(7)
        data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=4, tgt_len=16, cache_dir=str(tmp_path / "cache"))
        config = shrunk_preset("rmt", dict(SIZE, hidden_dropout_prob=0.1), SHRINK, bptt_depth=2)
        module = CausalLMPretraining("rmt", config=config, vocab_size=data.vocab_size, learning_rate=3e-3,
                                     replay_segments=replay)
        seen: list[float] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                seen.append(float(outputs["loss"]))

        trainer = L.Trainer(max_steps=4, default_root_dir=tmp_path / str(replay), logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[Record()],
                            enable_checkpointing=False, gradient_clip_val=0.25)
        trainer.fit(module, datamodule=data)
        losses[replay] = seen
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-5)
