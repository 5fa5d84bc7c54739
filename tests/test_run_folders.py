"""`--trainer.default_root_dir DIR` moves everything a run writes under DIR, for every YAML under configs/,
and one folder holds one run: a second run into it is refused unless it resumes the first."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longlm.training.cli import LongLMCLI
from longlm.training.datamodule import LMDataModule
from longlm.training.lm_module import CausalLMPretraining
from longlm.training.run_folder import claim_checkpoint_folders, lock_path
from tests.paths import ENWIK8_SAMPLE, PG19_SAMPLE, REPO, requires_shared_data

PRETRAIN_YAMLS = sorted((REPO / "configs" / "enwik8").glob("*.yaml")) + sorted((REPO / "configs" / "pg19").glob("*.yaml"))


class ResolvedConfig(Exception):
    """Raised with the trainer config once the CLI has merged the YAML, the flags and the root placeholder."""


class ConfigOnlyCLI(LongLMCLI):
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        raise ResolvedConfig(self.config.fit.trainer)


def resolved_trainer_config(yaml_path: Path, root: Path):
    with pytest.raises(ResolvedConfig) as caught:
        ConfigOnlyCLI(CausalLMPretraining, LMDataModule, args=["fit", "--config", str(yaml_path), "--trainer.default_root_dir", str(root)])
    return caught.value.args[0]


def written_paths(trainer) -> list[str]:
    """Every folder a logger or callback of the trainer config writes into."""
    paths = []
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for entry in [*loggers, *(trainer.callbacks or [])]:
        init_args = getattr(entry, "init_args", None)
        for key in ("save_dir", "dirpath"):
            if init_args is not None and getattr(init_args, key, None) is not None:
                paths.append(getattr(init_args, key))
    return paths


@pytest.mark.parametrize("yaml_path", PRETRAIN_YAMLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_pretraining_yaml_writes_under_the_root_it_is_given(yaml_path, tmp_path):
    root = tmp_path / "elsewhere"
    trainer = resolved_trainer_config(yaml_path, root)
    assert trainer.default_root_dir == str(root)
    paths = written_paths(trainer)
    assert paths, f"{yaml_path.name} configures no logger or checkpoint folder"
    for path in paths:
        assert Path(path).resolve().is_relative_to(root.resolve()), f"{yaml_path.name} writes to {path}"
    assert "${" not in repr(trainer)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@requires_shared_data
@pytest.mark.parametrize(("yaml_name", "data_path"), [
    ("enwik8/transformer-xl-tiny.yaml", ENWIK8_SAMPLE),
    ("pg19/transformer-xl-tiny.yaml", PG19_SAMPLE),
])
def test_a_real_run_writes_nothing_outside_its_root_and_a_second_run_is_refused(yaml_name, data_path, tmp_path):
    """Working directory and home stay empty; the only other place written is the data cache, which is
    shared across runs on purpose ($LONGLM_CACHE, here its own folder)."""
    cwd, home, cache, root = (tmp_path / name for name in ("cwd", "home", "cache", "root"))
    for folder in (cwd, home, cache):
        folder.mkdir()
    env = {**os.environ, "HOME": str(home), "LONGLM_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "MPLCONFIGDIR": str(cache / "matplotlib")}  # a tool cache, not the run's
    args = ["fit", "--config", str(REPO / "configs" / yaml_name), "--data.path", str(data_path),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "2",
            "--trainer.default_root_dir", str(root)]
    first = _run(args, cwd, env)
    assert first.returncode == 0, first.stderr[-3000:]
    for noise in ("litlogger", "LeafSpec", "Setting accelerator to CPU"):  # silenced in our entry points
        assert noise not in first.stdout + first.stderr
    assert _files(cwd) == set() and _files(home) == set()
    assert {p.relative_to(root).parts[0] for p in _files(root)} >= {"checkpoints", "logs", "tensorboard", "hf"}
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert not lock_path(root / "checkpoints").exists(), "the lock is released when the run ends"
    assert sorted(p.relative_to(tmp_path).parts[0] for p in _files(tmp_path)) == sorted(
        ["cache"] * len(_files(cache)) + ["root"] * len(_files(root))
    )

    before = _files(root)
    second = _run(args, cwd, env)
    assert second.returncode != 0
    message = second.stderr.strip().splitlines()[-1]
    assert "already holds an earlier run's checkpoints (last.ckpt)" in message and "--ckpt_path last" in message
    assert {p for p in _files(root) - before if "logs" not in p.parts and "tensorboard" not in p.parts} == set()

    resumed = _run([*args[:-4], "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), "--ckpt_path", "last"], cwd, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stdout + resumed.stderr  # the loader declares its state


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_stale_lock_is_not(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock_path(folder).write_text(f"{other.pid}@{socket.gethostname()}\n")
        with pytest.raises(RuntimeError, match=rf"is in use by another run \(process {other.pid}@"):
            claim_checkpoint_folders([folder], None)
    finally:
        other.kill()
        other.wait()
    claim_checkpoint_folders([folder], None)  # the process is gone: its lock is stale, this run takes it
    assert lock_path(folder).read_text().startswith(f"{os.getpid()}@")
