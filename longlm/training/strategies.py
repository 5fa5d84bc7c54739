"""DeepSpeed ZeRO 1/2/3 (with CPU offload) from a JSON file, on CUDA and, for the tests, on CPU with gloo.

In the YAML (`configs/deepspeed/` holds one JSON per recipe)::

    trainer:
      strategy:
        class_path: longlm.training.strategies.DeepSpeedZeRO
        init_args: {config: configs/deepspeed/zero2.json}

What it adds to Lightning's `DeepSpeedStrategy`:
- the JSON is checked when the run starts, one sentence per mistake;
- `"auto"` values are filled from the run: micro batch = `data.batch_size` (streams per rank), gradient
  clipping = `trainer.gradient_clip_val`, fp16/bf16 = `trainer.precision`, accumulation =
  `trainer.accumulate_grad_batches`, bucket sizes from the model's hidden size (Hugging Face's rules);
- CPU processes: Lightning refuses any accelerator but CUDA, while DeepSpeed itself runs ZeRO on CPU with
  its CPU accelerator and gloo (`DS_ACCELERATOR=cpu`, chosen by itself on a machine without a GPU);
- atomic checkpoint folders (see `longlm.training.checkpoint_io`).
"""
from __future__ import annotations

import copy
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from longlm.training.checkpoint_io import disk_full_error, publish_folder, remove_path, staging_path
from longlm.training.safe_load import check_checkpoint_folder

AUTO = "auto"
OFFLOAD_DEVICES = ("cpu", "nvme")


def load_deepspeed_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON config (or a dict); raise one clear sentence per mistake."""
    name = "<dict>" if isinstance(config, dict) else str(config)
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(
                f"DeepSpeed config '{path}' does not exist; expected a JSON file such as configs/deepspeed/zero2.json."
            )
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"DeepSpeed config '{path}' is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config '{name}' must be a JSON object, got {type(config).__name__}.")
    zero = config.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"DeepSpeed config '{name}': zero_optimization.stage must be 1, 2 or 3, got {stage!r}.")
    for key, lowest in (("offload_optimizer", 2), ("offload_param", 3)):
        device = (zero.get(key) or {}).get("device", "none")
        if device in OFFLOAD_DEVICES and stage < lowest:
            needs = "ZeRO stage 2 or 3" if lowest == 2 else "ZeRO stage 3"
            raise ValueError(f"DeepSpeed config '{name}': zero_optimization.{key} needs {needs}, got stage {stage}.")
    accumulation = config.get("gradient_accumulation_steps", AUTO)
    if accumulation != AUTO:
        raise ValueError(
            f"DeepSpeed config '{name}': gradient_accumulation_steps must be \"auto\" (set "
            f"trainer.accumulate_grad_batches instead), got {accumulation!r}."
        )
    return copy.deepcopy(config)


def fill_auto(config: dict[str, Any], values: dict[str, Any], name: str = "<dict>") -> dict[str, Any]:
    """A copy of `config` with each `"auto"` at a dotted key of `values` replaced by its value.

    `gradient_accumulation_steps: "auto"` is dropped: Lightning sets it from `accumulate_grad_batches`.
    Any other `"auto"` is an error: DeepSpeed itself does not read `"auto"`.
    """
    config = copy.deepcopy(config)
    if config.get("gradient_accumulation_steps") == AUTO:
        del config["gradient_accumulation_steps"]

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif value == AUTO:
                if values.get(dotted) is None:
                    raise ValueError(f"DeepSpeed config '{name}': {dotted} is \"auto\", which longlm cannot fill; give a value.")
                node[key] = values[dotted]

    walk(config, "")
    return config


def offloads_optimizer(strategy: Any) -> bool:
    """Whether `strategy` is DeepSpeed keeping optimizer states on the CPU (which wants DeepSpeedCPUAdam)."""
    config = getattr(strategy, "config", None) if isinstance(strategy, DeepSpeedStrategy) else None
    zero = (config or {}).get("zero_optimization") or {}
    return (zero.get("offload_optimizer") or {}).get("device", "none") in OFFLOAD_DEVICES


class DeepSpeedZeRO(DeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy` driven by a checked JSON file, with "auto" values and CPU processes.

    Everything ZeRO does is in the JSON: Lightning's per-option arguments (`stage`, `offload_optimizer`, ...)
    are left out so that a run cannot say one thing in the YAML and another in the JSON.

    Args:
        config: a DeepSpeed JSON file (e.g. `configs/deepspeed/zero3-offload.json`) or the same as a dict.
        logging_level: DeepSpeed's log level.
        timeout: how long a collective may wait for the other ranks.
        load_full_weights: resume from one consolidated fp32 file instead of a sharded folder (weights only).
    """

    strategy_name = "longlm_deepspeed"

    def __init__(
        self,
        config: str | dict[str, Any] = "configs/deepspeed/zero2.json",
        logging_level: int = logging.WARN,
        timeout: timedelta | None = default_pg_timeout,
        load_full_weights: bool = False,
    ) -> None:
        self.config_name = "<dict>" if isinstance(config, dict) else str(config)
        super().__init__(
            config=load_deepspeed_config(config), logging_level=logging_level, timeout=timeout, load_full_weights=load_full_weights
        )

    # --- CPU processes ----------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()
            return
        from deepspeed.accelerator import get_accelerator

        chosen = get_accelerator().device_name()
        if chosen != "cpu":
            raise RuntimeError(
                f"trainer.accelerator is cpu but DeepSpeed chose its {chosen} accelerator; set DS_ACCELERATOR=cpu "
                "in the environment before starting."
            )
        # DeepSpeed (`deepspeed.initialize(args.device_rank)`) and Lightning's device check read the local rank
        # from the device index; plain CPU devices carry none, so each process gets `cpu:<local rank>`, which
        # PyTorch treats as the CPU.
        self.parallel_devices = [torch.device("cpu", index) for index in range(len(self.parallel_devices or [None]))]
        DDPStrategy.setup_environment(self)  # skips Lightning's CUDA-only check

    # --- "auto" values ----------------------------------------------------------------------------------
    def _format_config(self) -> None:
        if self.lightning_module is not None:
            self.config = fill_auto(self.config, self._auto_values(), self.config_name)
        super()._format_config()

    def _auto_values(self) -> dict[str, Any]:
        trainer = self.lightning_module.trainer
        micro = getattr(trainer.datamodule, "batch_size", None) or 1
        precision = self.precision_plugin.precision
        model_config = getattr(getattr(self.lightning_module, "model", None), "config", None)
        hidden = getattr(model_config, "hidden_size", None)
        values: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro,
            "train_batch_size": micro * trainer.accumulate_grad_batches * self.world_size,
            "gradient_clipping": float(trainer.gradient_clip_val or 0.0),
            "fp16.enabled": precision in ("16-mixed", "16-true"),
            "bf16.enabled": precision in ("bf16-mixed", "bf16-true"),
        }
        if hidden is not None:
            values.update({
                "zero_optimization.reduce_bucket_size": hidden * hidden,
                "zero_optimization.allgather_bucket_size": hidden * hidden,
                "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
            })
        return values

    # --- atomic checkpoint folders -----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath: str | Path, storage_options: Any | None = None) -> None:
        """Every rank writes its shard into a hidden folder; rank 0 then points `filepath` at it atomically."""
        target = Path(self.broadcast(str(filepath)))
        staged = Path(self.broadcast(str(staging_path(target))))
        try:
            super().save_checkpoint(checkpoint, staged, storage_options)
        except (OSError, RuntimeError) as error:
            full = disk_full_error(error, target)
            if full is None:
                raise
            remove_path(staged)
            raise full from None
        self.barrier("longlm_checkpoint_written")
        if self.is_global_zero:
            publish_folder(staged, target)
        self.barrier("longlm_checkpoint_published")

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """DeepSpeed unpickles its shards with `weights_only=False`: each is first read with the restricted one."""
        if Path(checkpoint_path).is_dir():
            check_checkpoint_folder(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            remove_path(filepath)
