"""Write a Hugging Face folder (config, safetensors, flat model code, tokenizer) from training state."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from longlm.evaluation.strict_loading import describe_misfit, misfit_from_torch_error
from longlm.training.lm_module import CausalLMPretraining
from longlm.training.safe_load import check_checkpoint_folder, refusing_unsafe_pickles


def save_hf_folder(module: CausalLMPretraining, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(out_dir)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(out_dir)
    return out_dir


def consolidate_deepspeed_checkpoint(checkpoint_dir: str | Path, output_file: str | Path) -> Path:
    """A DeepSpeed checkpoint folder (one shard per rank) -> one fp32 Lightning checkpoint file.

    DeepSpeed's `zero_to_fp32` merges the shards (through Lightning's wrapper, which keeps the rest of the
    checkpoint: hyperparameters, the longlm state).
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "latest").is_file():
        raise FileNotFoundError(
            f"Checkpoint folder '{checkpoint_dir}' is not a DeepSpeed checkpoint; expected the folder pretrain.py "
            "writes under DeepSpeed, with a 'latest' file in it."
        )
    check_checkpoint_folder(checkpoint_dir)  # zero_to_fp32 itself unpickles with weights_only=False
    convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file)
    return Path(output_file)


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, fp32_checkpoint: str | Path | None = None) -> Path:
    """Any checkpoint written by `scripts/pretrain.py` -> HF folder.

    A DeepSpeed checkpoint (a folder) is first consolidated to one fp32 file: `fp32_checkpoint` if given
    (kept; it resumes or fine-tunes on one device), else a temporary file.
    """
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            single = consolidate_deepspeed_checkpoint(checkpoint_path, fp32_checkpoint or Path(tmp) / "fp32.ckpt")
            return export_checkpoint(single, out_dir)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"Checkpoint '{checkpoint_path}' does not exist; expected a .ckpt file written by pretrain.py.")
    try:
        with refusing_unsafe_pickles(checkpoint_path):
            module = CausalLMPretraining.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True)
    except RuntimeError as error:
        misfit = describe_misfit(misfit_from_torch_error(str(error)))
        if "Error(s) in loading state_dict" not in str(error) or not misfit:
            raise
        raise ValueError(
            f"The weights in checkpoint '{checkpoint_path}' do not fit the model its hyperparameters describe "
            f"({'; '.join(misfit)}); expected a checkpoint written by pretrain.py, unedited."
        ) from None
    return save_hf_folder(module, out_dir)


def full_parameters(trainer: L.Trainer, module: L.LightningModule):
    """Context in which every rank holds every parameter: DeepSpeed ZeRO-3 otherwise keeps a shard each."""
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


class ExportHuggingFace(L.Callback):
    """At the end of `fit`, write the HF folder to `<default_root_dir>/<dirname>`."""

    def __init__(self, dirname: str = "hf") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: CausalLMPretraining) -> None:
        with full_parameters(trainer, pl_module):  # every rank takes part in gathering ZeRO-3 shards
            if trainer.is_global_zero:
                out = save_hf_folder(pl_module, Path(trainer.default_root_dir) / self.dirname)
                rank_zero_info(f"Hugging Face folder written to {out}")
        trainer.strategy.barrier("longlm_export")
