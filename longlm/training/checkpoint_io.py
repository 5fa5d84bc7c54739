"""Checkpoint writes that a crash cannot leave half-done.

A checkpoint is written under a hidden temporary name in the same folder and only then renamed to its real
name (`os.replace`, atomic on POSIX). Lightning's default writes to the system temp folder and moves the
file over, which is a plain copy, not atomic, when that folder is on another file system. DeepSpeed
checkpoints are folders, which cannot be renamed over an existing folder: the real name becomes a symbolic
link to the finished folder and is swapped in one `os.replace`. So `last.ckpt` is always either the
previous checkpoint or the new one, and `--ckpt_path last` always finds one that loads.
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from longlm.training.safe_load import load_checkpoint_file


def staging_path(target: str | os.PathLike) -> Path:
    """A hidden sibling of `target` to write into; Lightning's search for `last*.ckpt` never matches it."""
    target = Path(target)
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so the rename is not committed before the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(staged: Path, target: Path) -> None:
    _fsync(staged)
    os.replace(staged, target)
    _fsync(target.parent)
    _remove_leftovers(target, keep=None)


def publish_folder(staged: Path, target: Path) -> None:
    """Make `target` a link to the finished folder `staged` in one atomic step; drop what it pointed to."""
    for file in staged.rglob("*"):
        if file.is_file():
            _fsync(file)
    if target.exists() and not target.is_symlink():  # a real file or folder from an older writer: move it aside
        os.rename(target, staging_path(target))
    link = staging_path(target)
    os.symlink(staged.name, link)
    os.replace(link, target)
    _fsync(target.parent)
    _remove_leftovers(target, keep=staged)  # the folder `target` pointed to before is one of them


def _remove_leftovers(target: Path, keep: Path | None) -> None:
    """Staged writes of `target` that a killed run left behind (one writer per name, so none is in use)."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if keep is None or path.name != keep.name:
            remove_path(path)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a checkpoint: a file, a folder, or a link together with the staged folder it points to (a
    link to anything else, such as Lightning's `save_last="link"`, loses only the link)."""
    path = Path(path)
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        path.unlink()
        if target.parent == path.parent and target.name.startswith(f".{path.name}."):
            remove_path(target)
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(error: BaseException, target: Path) -> OSError | None:
    """One sentence for a write that ran out of space (None for any other error): the file, the folder's
    free space, and that the previous checkpoint under that name is untouched."""
    chained = [error, error.__cause__, error.__context__]
    full = any(isinstance(e, OSError) and e.errno in DISK_FULL for e in chained)
    if not full:
        try:
            full = shutil.disk_usage(target.parent).free < 1 << 20  # DeepSpeed's own writes say only "enforce fail"
        except OSError:
            full = False
    if not full:
        return None
    previous = "the previous one is untouched and loads" if target.exists() else "no earlier checkpoint had this name"
    return OSError(
        errno.ENOSPC,
        f"No space left on device while writing checkpoint '{target}'; {previous}: free space in '{target.parent}' "
        "and resume with --ckpt_path last",
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose writes are atomic (a temporary file beside the target, then `os.replace`) and
    whose reads never run code from the file (`longlm.training.safe_load`: `weights_only=True`, allow-list)."""

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"AtomicCheckpointIO loads '{path}' with weights_only=True only; weights_only=False would let the file run code."
            )
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file '{path}' does not exist; expected a .ckpt written by longlm.")
        return load_checkpoint_file(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_path(target)
        try:
            with open(staged, "wb") as file:  # through Python's file, a full disk is ENOSPC, not a C++ stream error
                torch.save(checkpoint, file)
            publish_file(staged, target)
        except (OSError, RuntimeError) as error:
            full = disk_full_error(error, target)
            if full is None:
                raise
            raise full from None
        finally:
            staged.unlink(missing_ok=True)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        remove_path(path)
