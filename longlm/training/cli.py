"""`LightningCLI` for pretraining: `python scripts/pretrain.py fit --config configs/...yaml [--overrides]`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from longlm.training.checkpoint_io import AtomicCheckpointIO
from longlm.training.datamodule import LMDataModule
from longlm.training.lm_module import CausalLMPretraining
from longlm.training.objectives import needs_encoder_tokens
from longlm.training.quiet import silence_known_noise
from longlm.training.run_folder import claim_checkpoint_folders, resolve_root_dir
from longlm.training.safe_load import check_checkpoint_file
from longlm.training.strategies import DeepSpeedZeRO, load_deepspeed_config


class ResumeWithTheRunsConfig(LightningCLI):
    """`--ckpt_path FILE` resumes with the config the command line gives, exactly like `--ckpt_path last`.

    Lightning's CLI otherwise replaces the model arguments by the hyperparameters stored in a checkpoint
    file, silently dropping any `--model.*` value the user passed; here the file is only read safely (no
    code runs from it) and the module compares the checkpoint's model with the run's when it is restored,
    refusing a difference with one sentence.
    """

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)  # a crafted file is refused here, before anything is built


class OneRunPerFolder(LightningCLI):
    """`${trainer.default_root_dir}` in logger and callback paths is the run's root (`longlm.training.run_folder`),
    and a run refuses a checkpoint folder that another run writes to."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None:
            resolve_root_dir(trainer, trainer.get("default_root_dir") or os.getcwd())

    def before_fit(self) -> None:
        if rank_zero_only.rank == 0:  # the other ranks write into the folders rank 0 claimed
            folders = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            claim_checkpoint_folders(folders, self.config.fit.get("ckpt_path"))


class LongLMCLI(ResumeWithTheRunsConfig, OneRunPerFolder):
    def add_arguments_to_parser(self, parser) -> None:
        # The model's vocabulary is whatever the data's tokenizer has (bytes: 259; PG-19: its BPE).
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # masked LM needs <mask> in the tokenizer, so the data's tokenizer (and with it that vocabulary) follows the task
        parser.link_arguments("model.task", "data.encoder_tokens", compute_fn=needs_encoder_tokens)

    def before_instantiate_classes(self) -> None:
        """Check a DeepSpeed JSON before jsonargparse builds the strategy (it would bury the error in a list)."""
        super().before_instantiate_classes()
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        strategy = config.get("trainer.strategy")
        if getattr(strategy, "class_path", None) == f"{DeepSpeedZeRO.__module__}.{DeepSpeedZeRO.__name__}":
            load_deepspeed_config(strategy.init_args.get("config", "configs/deepspeed/zero2.json"))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        return use_atomic_checkpoints(super().instantiate_trainer(**kwargs))


def use_atomic_checkpoints(trainer: L.Trainer) -> L.Trainer:
    """Swap Lightning's default checkpoint writer for `AtomicCheckpointIO` (a plugin the YAML names stays)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def main(args: list[str] | None = None) -> LongLMCLI:
    silence_known_noise()
    return LongLMCLI(
        CausalLMPretraining,
        LMDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
