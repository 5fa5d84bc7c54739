"""`LightningCLI` for pretraining: `python scripts/pretrain.py fit --config configs/...yaml [--overrides]`."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from longlm.training.checkpoint_io import AtomicCheckpointIO
from longlm.training.datamodule import LMDataModule
from longlm.training.lm_module import CausalLMPretraining
from longlm.training.objectives import needs_encoder_tokens
from longlm.training.strategies import DeepSpeedZeRO, load_deepspeed_config


class LongLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model's vocabulary is whatever the data's tokenizer has (bytes: 259; PG-19: its BPE).
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # masked LM needs <mask> in the tokenizer, so the data's tokenizer (and with it that vocabulary) follows the task
        parser.link_arguments("model.task", "data.encoder_tokens", compute_fn=needs_encoder_tokens)

    def before_instantiate_classes(self) -> None:
        """Check a DeepSpeed JSON before jsonargparse builds the strategy (it would bury the error in a list)."""
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
    return LongLMCLI(
        CausalLMPretraining,
        LMDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
