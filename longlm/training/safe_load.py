"""Loading checkpoints that may come from someone else: nothing in a file runs code.

Every `.ckpt` (and every shard of a DeepSpeed checkpoint folder) is read with `torch.load(weights_only=True)`,
whose unpickler builds only tensors, containers and primitives, plus the few classes allow-listed here:
exactly the types the checkpoints `scripts/pretrain.py` and `scripts/finetune_qa.py` write hold beyond
those. A file that names any other global (`os.system`, `builtins.exec`, a class of its own) is refused
before anything in it is built.

DeepSpeed's own loaders (`zero_to_fp32`, `engine.load_checkpoint`) unpickle with `weights_only=False`;
`check_checkpoint_folder` therefore reads every shard with the restricted unpickler first, so what DeepSpeed
then unpickles can only name allow-listed globals.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SHARD_SUFFIXES = (".pt", ".ckpt", ".bin")


def deepspeed_globals() -> list[type]:
    """The classes a DeepSpeed optimizer shard pickles (the ZeRO stage and the fp16 loss scaler)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
    except ImportError:  # without DeepSpeed there are no DeepSpeed checkpoints to read
        return []
    return [ZeroStageEnum, LossScaler]


def checkpoint_globals() -> list[Any]:
    """Everything our checkpoints hold that `weights_only=True` does not build by default."""
    return deepspeed_globals()


class UnsafeCheckpointError(ValueError):
    """A checkpoint file names a global outside the allow-list: unpickling it could run code."""


def _refusal(path: str | Path, error: Exception) -> UnsafeCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"the global '{found.group(1)}'" if found else "an object outside the allow-list"
    return UnsafeCheckpointError(
        f"Checkpoint '{path}' holds {what}, which no checkpoint written by longlm holds; it was not loaded, "
        "because unpickling it could run code (expected tensors, numbers, strings and containers only)."
    )


@contextlib.contextmanager
def refusing_unsafe_pickles(path: str | Path) -> Iterator[None]:
    """Within: `torch.load(..., weights_only=True)` accepts our allow-list; a refused pickle becomes one sentence."""
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            yield
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file, unpickled with the restricted unpickler (`mmap`: tensors stay on disk until read,
    for a check that only needs the pickle to pass)."""
    with refusing_unsafe_pickles(path):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a file the restricted unpickler would not load, without reading its tensors into memory."""
    try:
        load_checkpoint_file(path, mmap=True)
    except RuntimeError as error:  # mmap needs the zip format; an old-format file is read whole instead
        if "mmap" not in str(error):
            raise
        load_checkpoint_file(path)


def check_deepspeed_tag(folder: Path) -> None:
    """DeepSpeed reads the shards from `folder/<the name in 'latest'>`: that name must be a folder inside."""
    latest = folder / "latest"
    if not latest.is_file():
        return
    tag = latest.read_text(errors="replace").strip()
    inside = (folder / tag).resolve()
    if not tag or tag != Path(tag).name or inside.parent != folder.resolve() or not inside.is_dir():
        raise UnsafeCheckpointError(
            f"DeepSpeed checkpoint '{folder}': its 'latest' file names {tag!r}, expected the name of a folder inside it."
        )


def check_checkpoint_folder(folder: str | Path) -> None:
    """Refuse a DeepSpeed checkpoint folder whose 'latest' points outside it, or with any shard that would
    not load with the restricted unpickler."""
    folder = Path(folder)
    check_deepspeed_tag(folder)
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in SHARD_SUFFIXES:
            check_checkpoint_file(file)
