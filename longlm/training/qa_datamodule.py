"""`QADataModule`: SQuAD v1.1/v2.0 or TriviaQA files -> windows of question + context for fine-tuning."""
from __future__ import annotations

from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from longlm.data.qa import QAExample, QAFeatures, collate, featurize, load_qa_examples


class QADataModule(L.LightningDataModule):
    """Training windows (answer positions as labels) and validation examples (scored with EM/F1).

    Args:
        train_file / validation_file: SQuAD-format JSON, TriviaQA's official JSON or its SQuAD-style conversion.
        format: "auto", "squad" or "triviaqa"; evidence_dir: TriviaQA's evidence folder (official format).
        max_length: tokens per window (question + context + specials): a document that fits is one window.
        stride: tokens shared by consecutive windows of a longer document.
        truncate: keep only the first window of each example (training and validation), as a model limited to
            `max_length` tokens reads a long document.
        batch_size / eval_batch_size: windows per step.
        max_train_examples / max_eval_examples: use only the first N examples (quick runs).
        tokenizer: set from the model (the fine-tuning module loads it with the weights).
    """

    def __init__(
        self,
        train_file: str,
        validation_file: str | None = None,
        format: str = "auto",
        evidence_dir: str | None = None,
        max_length: int = 4096,
        stride: int = 256,
        truncate: bool = False,
        batch_size: int = 1,
        eval_batch_size: int = 2,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}.")
        if not isinstance(stride, int) or not 0 <= stride < max_length:
            raise ValueError(f"data.stride must be an integer in [0, max_length={max_length}), got {stride!r}.")
        for name, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"data.{name} must be a positive integer or null (all examples), got {value!r}.")
        self.save_hyperparameters()
        self.train_examples: list[QAExample] = []
        self.validation_examples: list[QAExample] = []
        self.train_features: QAFeatures | None = None
        self.validation_features: QAFeatures | None = None

    def _load(self, path: str, limit: int | None) -> list[QAExample]:
        examples = load_qa_examples(path, format=self.hparams.format, evidence_dir=self.hparams.evidence_dir)
        return examples if limit is None else examples[:limit]

    def setup(self, stage: str | None = None) -> None:
        tokenizer = self.trainer.lightning_module.tokenizer
        hp = self.hparams
        if stage in (None, "fit") and self.train_features is None:
            self.train_examples = self._load(hp.train_file, hp.max_train_examples)
            self.train_features = featurize(self.train_examples, tokenizer, hp.max_length, hp.stride, training=True, truncate=hp.truncate)
            rank_zero_info(f"QA training features: {self.train_features.stats.as_dict()}")
        if stage in (None, "fit", "validate") and hp.validation_file and self.validation_features is None:
            self.validation_examples = self._load(hp.validation_file, hp.max_eval_examples)
            self.validation_features = featurize(self.validation_examples, tokenizer, hp.max_length, hp.stride, training=False, truncate=hp.truncate)
            rank_zero_info(f"QA validation features: {self.validation_features.stats.as_dict()}")

    def _collate(self):
        return partial(collate, pad_token_id=self.trainer.lightning_module.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_features, batch_size=self.hparams.batch_size, shuffle=True, generator=generator,
            collate_fn=self._collate(),
        )

    def val_dataloader(self) -> DataLoader:
        if self.validation_features is None:
            return []
        return DataLoader(self.validation_features, batch_size=self.hparams.eval_batch_size, collate_fn=self._collate())
