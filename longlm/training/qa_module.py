"""`QuestionAnsweringFinetuning`: extractive QA fine-tuning from any longlm folder.

Validation runs every window of the validation examples, merges them per example (`longlm.data.qa.postprocess`)
and logs the official EM/F1 (`val_exact`, `val_f1`, and for SQuAD v2 the HasAns/NoAns splits), the same
numbers `scripts/evaluate_qa.py` prints for the exported folder.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from longlm.data.qa import postprocess
from longlm.evaluation.qa import load_qa_model
from longlm.evaluation.qa_metrics import score_predictions
from longlm.training.optim import adamw_with_warmup_cosine


class QuestionAnsweringFinetuning(L.LightningModule):
    """Args:
        pretrained: an HF folder (longlm pretraining's `hf/`, a QA fine-tune, `convert_hf.py` output).
        config: `LongLMConfig` overrides applied when loading (e.g. `hidden_dropout_prob`, or `is_decoder: false`
            to make a decoder checkpoint bidirectional).
        learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with warmup + cosine decay.
        n_best, max_answer_length, null_threshold: answer extraction for validation.
        gradient_checkpointing: recompute blocks in backward (long windows on small memory).
    """

    def __init__(
        self,
        pretrained: str,
        config: dict[str, Any] | None = None,
        learning_rate: float = 3e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        n_best: int | None = None,
        max_answer_length: int = 30,
        null_threshold: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model, self.tokenizer = load_qa_model(pretrained, **(config or {}))
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        self._val_starts: list = []
        self._val_ends: list = []

    def _forward(self, batch: dict[str, torch.Tensor]):
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            start_positions=batch.get("start_positions"),
            end_positions=batch.get("end_positions"),
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._forward(batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_starts, self._val_ends = [], []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            self._val_starts.append(out.start_logits[row, :length].float().cpu().numpy())
            self._val_ends.append(out.end_logits[row, :length].float().cpu().numpy())

    def on_validation_epoch_end(self) -> None:
        data = self.trainer.datamodule
        if data is None or data.validation_features is None or len(self._val_starts) != len(data.validation_features):
            return  # a sanity check or a limited run saw only part of the windows: no per-example score
        examples = data.validation_examples
        predictions, _ = postprocess(
            examples, data.validation_features, self._val_starts, self._val_ends,
            n_best=self.hparams.n_best, max_answer_length=self.hparams.max_answer_length,
            null_threshold=self.hparams.null_threshold, version_2=any(e.is_impossible for e in examples),
        )
        for name, value in score_predictions(examples, predictions).items():
            if not name.endswith("total"):
                self.log(f"val_{name}", float(value), prog_bar=name in ("exact", "f1", "exact_match"), rank_zero_only=True)

    def configure_optimizers(self):
        return adamw_with_warmup_cosine(self, self.model)
