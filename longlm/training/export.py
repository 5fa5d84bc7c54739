"""Write a Hugging Face folder (config, safetensors, flat model code, tokenizer) from training state."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from longlm.training.lm_module import CausalLMPretraining


def save_hf_folder(module: CausalLMPretraining, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(out_dir)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(out_dir)
    return out_dir


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Any Lightning checkpoint written by `scripts/pretrain.py` -> HF folder."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"Checkpoint '{checkpoint_path}' does not exist; expected a .ckpt file written by pretrain.py.")
    module = CausalLMPretraining.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=False)
    return save_hf_folder(module, out_dir)


class ExportHuggingFace(L.Callback):
    """At the end of `fit`, write the HF folder to `<default_root_dir>/<dirname>`."""

    def __init__(self, dirname: str = "hf") -> None:
        self.dirname = dirname

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: CausalLMPretraining) -> None:
        out = save_hf_folder(pl_module, Path(trainer.default_root_dir) / self.dirname)
        rank_zero_info(f"Hugging Face folder written to {out}")
