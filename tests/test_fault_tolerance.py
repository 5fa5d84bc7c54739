"""Faults: a checkpoint write killed half-way leaves the previous checkpoint intact, and a training run killed
with SIGKILL resumes with `--ckpt_path last` exactly where an uninterrupted run would be."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longlm.training.checkpoint_io import AtomicCheckpointIO, publish_folder, remove_path, staging_path
from tests.paths import REPO, requires_shared_data
from tests.test_scaling import logged_losses, pretrain, write_config

WRITER = """
import sys, torch
from longlm.training.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1}, sys.argv[1])
print("first written", flush=True)
io.save_checkpoint({"step": 2, "blob": torch.ones(100_000_000)}, sys.argv[1])  # 400 MB: long enough to be killed in
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB file system (tmpfs) to fill up; skipped where this process may not mount one."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'}); a full disk needs one")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(small_disk):
    last = small_disk / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, last)
    with pytest.raises(OSError, match=r"No space left on device while writing checkpoint '.*last\.ckpt'; the previous one is untouched") as error:
        io.save_checkpoint({"step": 2, "weights": torch.ones(1_000_000)}, last)  # 4 MB into 2 MiB
    assert "\n" not in str(error.value)
    assert torch.load(last, weights_only=True)["step"] == 1  # still whole and loadable
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt"]  # the partial write is gone


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _last_checkpoint_reached(last: Path, step: int):
    """A condition: `last` holds `global_step >= step` (read again only when the file was replaced)."""
    seen = {"inode": None, "step": -1}

    def reached() -> bool:
        try:
            inode = last.stat().st_ino
        except FileNotFoundError:
            return False
        if inode != seen["inode"]:
            seen["inode"], seen["step"] = inode, torch.load(last, weights_only=True)["global_step"]
        return seen["step"] >= step

    return reached


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_one_loadable(tmp_path):
    last = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "first written"

    def writing() -> bool:
        return any(p.stat().st_size > 0 for p in tmp_path.glob(".last.ckpt.*"))

    _wait_for(writing, process, "the second write started")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".last.ckpt.*")), "killed after the write finished; the test proves nothing"
    assert torch.load(last, weights_only=True) == {"step": 1}  # the old checkpoint, whole
    # the next write succeeds and sweeps away what the killed one left
    AtomicCheckpointIO().save_checkpoint({"step": 3}, last)
    assert torch.load(last, weights_only=True) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_checkpoint_folder_is_swapped_in_by_one_rename(tmp_path):
    """DeepSpeed writes folders: `last.ckpt` becomes a link to the finished folder, replaced atomically."""
    target = tmp_path / "last.ckpt"
    for step in (1, 2):
        staged = staging_path(target)
        staged.mkdir()
        (staged / "latest").write_text(str(step))
        publish_folder(staged, target)
        assert (target / "latest").read_text() == str(step)
    assert target.is_symlink() and len(list(tmp_path.iterdir())) == 2  # the link and one folder: step 1's is gone
    remove_path(target)
    assert list(tmp_path.iterdir()) == []
    # a link it did not make (Lightning's save_last="link") is removed without what it points to
    other = tmp_path / "epoch=0-step=2.ckpt"
    other.mkdir()
    (tmp_path / "last.ckpt").symlink_to(other.name)
    remove_path(tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == [other]


@requires_shared_data
def test_sigkill_after_the_second_checkpoint_then_ckpt_path_last_resumes_exactly(tmp_path):
    """Dropout is on, so the next losses only match if the RNG, the memory and the stream position resume."""
    model = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, mem_len=16, hidden_dropout_prob=0.1)
    steps = 60  # far more than can run between the second checkpoint and the kill

    uninterrupted = tmp_path / "uninterrupted"
    write_config(uninterrupted / "run.yaml", max_steps=steps, model_config=model, cache_dir=tmp_path / "cache")
    pretrain(uninterrupted)
    expected = logged_losses(uninterrupted)

    killed = tmp_path / "killed"
    write_config(killed / "run.yaml", max_steps=steps, model_config=model, cache_dir=tmp_path / "cache")
    command = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "fit", "--config", "run.yaml"]
    with open(killed / "out.log", "w") as log:
        process = subprocess.Popen(command, cwd=killed, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _wait_for(_last_checkpoint_reached(killed / "run" / "checkpoints" / "last.ckpt", 4), process, "the second checkpoint")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    latest = torch.load(killed / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 4 <= latest < steps

    pretrain(killed, "--ckpt_path", "last")  # the same command, resumed
    resumed = logged_losses(killed)
    assert min(resumed) == latest  # it went on from the latest checkpoint
    assert resumed[latest] == pytest.approx(expected[latest], abs=1e-6)
    assert [resumed[s] for s in range(latest, steps)] == pytest.approx([expected[s] for s in range(latest, steps)], abs=1e-6)
