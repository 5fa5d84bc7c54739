"""`LightningCLI` for pretraining: `python scripts/pretrain.py fit --config configs/...yaml [--overrides]`."""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from longlm.training.datamodule import LMDataModule
from longlm.training.lm_module import CausalLMPretraining


class LongLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model's vocabulary is whatever the data's tokenizer has (bytes: 259; PG-19: its BPE).
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None) -> LongLMCLI:
    return LongLMCLI(
        CausalLMPretraining,
        LMDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
