"""`LightningCLI` for QA fine-tuning: `python scripts/finetune_qa.py fit --config configs/qa/...yaml
--model.pretrained DIR`."""
from __future__ import annotations

from typing import Any

import lightning as L

from longlm.training.cli import OneRunPerFolder, ResumeWithTheRunsConfig, use_atomic_checkpoints
from longlm.training.quiet import silence_known_noise
from longlm.training.qa_datamodule import QADataModule
from longlm.training.qa_module import QuestionAnsweringFinetuning


class QACLI(ResumeWithTheRunsConfig, OneRunPerFolder):
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        return use_atomic_checkpoints(super().instantiate_trainer(**kwargs))


def main(args: list[str] | None = None) -> QACLI:
    silence_known_noise()
    return QACLI(QuestionAnsweringFinetuning, QADataModule, save_config_kwargs={"overwrite": True}, args=args)
