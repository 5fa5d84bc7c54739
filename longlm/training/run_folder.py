"""Everything a run writes lives under `trainer.default_root_dir`, and one folder holds one run.

The YAMLs under `configs/` write their logger folders and checkpoint folder as `${trainer.default_root_dir}/...`;
`resolve_root_dir` replaces that placeholder with the run's final root (after the YAML and the command line
are merged), so `--trainer.default_root_dir DIR` moves checkpoints, CSV/TensorBoard logs and the HF export
together. `claim_checkpoint_folders` then refuses a second run that would write its checkpoints beside
another run's: one still running (a lock file with its process id), or one that finished, unless this run
resumes it (`--ckpt_path last`, or a checkpoint inside that folder).

"""
from __future__ import annotations

import atexit
import os
import socket
from pathlib import Path
from typing import Any

ROOT_PLACEHOLDER = "${trainer.default_root_dir}"
RESUME_KEYWORDS = ("last", "hpc", "best", "registry")


def _entries(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_root_dir(trainer_config: Any, root: str | os.PathLike) -> None:
    """In place: each logger's and callback's string argument that starts with the placeholder gets `root`."""
    root = str(root)
    for entry in _entries(trainer_config.get("logger")) + _entries(trainer_config.get("callbacks")):
        init_args = getattr(entry, "init_args", None)
        for key, value in list(vars(init_args).items()) if init_args is not None else []:
            if isinstance(value, str) and value.startswith(ROOT_PLACEHOLDER):
                setattr(init_args, key, root + value[len(ROOT_PLACEHOLDER):])


def lock_path(folder: Path) -> Path:
    """Beside the checkpoint folder, not in it (Lightning warns about a non-empty checkpoint folder)."""
    return folder.parent / f".{folder.name}.longlm-lock"


def _is_resume_of(ckpt_path: str | None, folder: Path) -> bool:
    if ckpt_path is None:
        return False
    if str(ckpt_path) in RESUME_KEYWORDS:
        return True
    return Path(ckpt_path).resolve().parent == folder.resolve()


def _lock_holder(lock: Path) -> str | None:
    """`pid@host` of a live run holding `lock` on this host (a lock whose process is gone is stale)."""
    try:
        pid_text, host = lock.read_text().strip().split("@", 1)
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return f"{pid}@{host}"  # another machine's run: cannot check, so it counts as live
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return None if pid == os.getpid() else f"{pid}@{host}"


def claim_checkpoint_folders(folders: list[Path], ckpt_path: str | None) -> None:
    """Refuse (one sentence) if another run writes to one of `folders`, else lock them for this process."""
    for folder in folders:
        holder = _lock_holder(lock_path(folder))
        if holder is not None:
            raise RuntimeError(
                f"Checkpoint folder '{folder}' is in use by another run (process {holder}); give this run its own "
                "--trainer.default_root_dir."
            )
        earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if earlier and not _is_resume_of(ckpt_path, folder):
            raise RuntimeError(
                f"Checkpoint folder '{folder}' already holds an earlier run's checkpoints ({', '.join(earlier[:3])}"
                f"{', ...' if len(earlier) > 3 else ''}); resume it with --ckpt_path last, or give this run its own "
                "--trainer.default_root_dir."
            )
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        lock = lock_path(folder)
        lock.write_text(f"{os.getpid()}@{socket.gethostname()}\n")
        atexit.register(release_lock, lock)


def release_lock(lock: Path) -> None:
    try:
        if lock.read_text().strip() == f"{os.getpid()}@{socket.gethostname()}":
            lock.unlink()
    except OSError:
        pass
