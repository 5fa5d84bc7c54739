"""What a user sees when resuming: the loader declares its state (so Lightning's "not resumable" warning is
gone because it is no longer true), the resumed run is still exact, and the progress bar counts the run's
steps (not `Epoch 3/-2`, not `1000/950`)."""
from __future__ import annotations

import warnings

import lightning as L
import pytest

from longlm.training import CausalLMPretraining, LMDataModule, StepProgressBar
from longlm.training.safe_load import load_checkpoint_file
from tests.paths import ENWIK8_SAMPLE, requires_shared_data
from tests.test_training import TINY, LossRecorder

pytestmark = requires_shared_data


class BarRecorder(StepProgressBar):
    """Records (description, completed, total) of the training bar after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = self.progress.tasks[self.train_progress_bar_id]
        self.seen.append((task.description, task.completed, task.total))


def _fit(root, max_steps, *, ckpt_path=None, tgt_len=32):
    """A step-bound run (max_steps, no max_epochs: every longlm YAML) that checkpoints inside its first epoch."""
    L.seed_everything(7)
    data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=8, tgt_len=tgt_len, cache_dir=str(root / "cache"))
    module = CausalLMPretraining("transformer-xl", config=TINY, vocab_size=data.vocab_size, learning_rate=3e-3)
    recorder, bar = LossRecorder(), BarRecorder()
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[recorder, bar, L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, recorder, bar, [str(w.message) for w in caught]


def test_mid_epoch_resume_is_declared_exact_and_the_bar_counts_steps(tmp_path):
    trainer, uninterrupted, bar, _ = _fit(tmp_path / "a", 8)
    epoch_length = len(trainer.train_dataloader)
    assert 3 % epoch_length != 0, "the checkpoint must fall inside an epoch for this test to mean anything"
    descriptions = {d.strip() for d, _, _ in bar.seen}
    assert all("/" not in d for d in descriptions), descriptions  # no "Epoch 3/-2"
    assert [(completed, total) for _, completed, total in bar.seen] == [(step, 8) for step in range(1, 9)]

    checkpoint = load_checkpoint_file(next((tmp_path / "a" / "ckpt").glob("*step=3.ckpt")))
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"next_train_segment": 3}]

    resumed_trainer, resumed, bar, messages = _fit(tmp_path / "b", 8, ckpt_path=next((tmp_path / "a" / "ckpt").glob("*step=3.ckpt")))
    assert not [m for m in messages if "not resumable" in m], messages
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], abs=1e-6)
    assert resumed.segments == uninterrupted.segments[3:]
    assert [(completed, total) for _, completed, total in bar.seen] == [(step, 8) for step in range(4, 9)]  # not 1000/950
