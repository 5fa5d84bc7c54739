"""Lightning side of longlm: the LM module, the data module, the CLI and HF export."""
from longlm.training.datamodule import LMDataModule
from longlm.training.export import ExportHuggingFace, export_checkpoint, save_hf_folder
from longlm.training.lm_module import CausalLMPretraining
from longlm.training.objectives import OBJECTIVES
from longlm.training.progress import StepProgressBar

__all__ = ["LMDataModule", "CausalLMPretraining", "OBJECTIVES", "ExportHuggingFace", "export_checkpoint", "save_hf_folder", "StepProgressBar"]
