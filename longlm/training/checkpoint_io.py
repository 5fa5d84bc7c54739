"""Checkpoint writes that a crash cannot leave half-done.

A checkpoint is written under a hidden temporary name in the same folder and only then renamed to its real
name (`os.replace`, atomic on POSIX). Lightning's default writes to the system temp folder and moves the
file over, which is a plain copy, not atomic, when that folder is on another file system. DeepSpeed
checkpoints are folders, which cannot be renamed over an existing folder: the real name becomes a symbolic
link to the finished folder and is swapped in one `os.replace`. So `last.ckpt` is always either the
previous checkpoint or the new one, and `--ckpt_path last` always finds one that loads.
"""
from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose writes are atomic: a temporary file beside the target, then `os.replace`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_path(target)
        try:
            torch.save(checkpoint, staged)
            publish_file(staged, target)
        finally:
            staged.unlink(missing_ok=True)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        remove_path(path)
