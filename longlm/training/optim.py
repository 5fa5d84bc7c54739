"""The optimiser every longlm module uses: AdamW (no decay on norms and biases), warmup then cosine decay."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from longlm.training.schedule import warmup_cosine


def adamw_with_warmup_cosine(module: L.LightningModule, model: torch.nn.Module) -> dict:
    """`configure_optimizers` output from the module's hparams (learning_rate, weight_decay, betas,
    warmup_steps, min_lr_ratio), decaying over the run's total steps."""
    hp = module.hparams
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name or "bias" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = _adamw(groups, hp.learning_rate, tuple(hp.betas), module._trainer)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup, floor = hp.warmup_steps, hp.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, floor))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], trainer: Any) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU AdamW (a compiled op) when DeepSpeed keeps the optimizer states on the CPU."""
    from longlm.training.strategies import offloads_optimizer

    if trainer is not None and offloads_optimizer(trainer.strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
