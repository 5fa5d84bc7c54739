"""A progress bar that tells the truth when training is bounded by steps, not epochs.

With `max_steps` and no `max_epochs` (every longlm YAML: the streams are cycled until the step budget is
spent), Lightning's bars read `Epoch 3/-2` (max_epochs is -1 internally) and, on resume, `1000/950` (the
batch index of the whole epoch over the steps left in the run). `StepProgressBar` shows the run instead:
`Epoch 3`, then optimizer steps done out of `max_steps`, which is also what a resumed run continues.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def step_bound(trainer: L.Trainer) -> bool:
    return trainer.max_epochs is not None and trainer.max_epochs < 0 and (trainer.max_steps or 0) > 0


class StepProgressBar(RichProgressBar):
    """`RichProgressBar` counting optimizer steps out of `max_steps` when the run is step-bound."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if step_bound(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not step_bound(self.trainer):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if step_bound(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)
