"""The README's main command runs as a user runs it (shortened to a few steps here)."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

from longlm import quickstart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_quickstart(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longlm.quickstart", "--max-steps", "20", "--new-tokens", "40", *extra],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={"LONGLM_CACHE": str(cwd / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_main_command_trains_reloads_plots_and_prints_a_sample(tmp_path):
    result = run_quickstart(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "validation bits per character:" in out
    sample = out.split("----- sample -----")[1].split("------------------")[0]
    assert sample.strip().startswith("Anne Elliot") and len(sample.strip()) > len("Anne Elliot")
    summary = summary_of(result)
    assert summary["hf_dir"] == "runs/quickstart/hf" and (tmp_path / summary["hf_dir"] / "config.json").exists()
    png = tmp_path / summary["loss_curve"]
    assert png == tmp_path / "runs/quickstart/loss.png" and png.read_bytes().startswith(PNG_SIGNATURE)
    assert f"loss curve: {summary['loss_curve']}" in out
    assert "tensorboard --logdir runs/quickstart/tensorboard" in out
    assert any((tmp_path / "runs/quickstart/tensorboard").rglob("events.out.tfevents.*"))
    assert "LightningCLI's args parameter" not in result.stderr  # our flags are not mistaken for the CLI's


def test_a_second_run_gets_its_own_folder_and_says_so(tmp_path):
    first = run_quickstart(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "runs/quickstart/checkpoints/last.ckpt"
    first_checkpoint = (last.read_bytes(), last.stat().st_mtime_ns)
    second = run_quickstart(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "runs/quickstart holds an earlier quickstart run; this run writes to runs/quickstart-2." in second.stdout
    assert summary_of(second)["hf_dir"] == "runs/quickstart-2/hf"
    assert (tmp_path / "runs/quickstart-2/loss.png").exists()
    assert (last.read_bytes(), last.stat().st_mtime_ns) == first_checkpoint  # the first run is left alone


def test_an_explicit_root_that_holds_a_run_is_refused_not_overwritten(tmp_path):
    root = tmp_path / "mine"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    result = run_quickstart(tmp_path, "--root-dir", str(root))
    assert result.returncode != 0
    assert "already holds an earlier run's checkpoints" in result.stderr
    assert (root / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run"


def test_fresh_root_skips_every_folder_that_holds_something(tmp_path):
    default = tmp_path / "runs" / "quickstart"
    assert quickstart.fresh_root(default) == default
    for name in ("quickstart", "quickstart-2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "hf").mkdir()
    (tmp_path / "runs" / "quickstart-3").mkdir()  # empty: nothing to clash with
    assert quickstart.fresh_root(default) == tmp_path / "runs" / "quickstart-3"


def write_metrics(path: Path, rows: list[dict]) -> None:
    columns = ["epoch", "step", "train_loss", "val_loss"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in rows)


def test_loss_curve_reads_the_csv_logger_and_draws_a_png(tmp_path):
    rows = [{"epoch": 0, "step": s, "train_loss": 5.0 / (1 + s)} for s in range(0, 100, 10)]
    rows.append({"epoch": 0, "step": 99, "val_loss": 0.7})
    write_metrics(tmp_path / "metrics.csv", rows)
    curves = quickstart.read_losses(tmp_path / "metrics.csv")
    assert [step for step, _ in curves["train_loss"]] == list(range(0, 100, 10))
    assert math.isclose(curves["train_loss"][3][1], 5.0 / 31) and curves["val_loss"] == [(99, 0.7)]
    png = quickstart.save_loss_curve(tmp_path / "metrics.csv", tmp_path / "out" / "loss.png")
    assert png == tmp_path / "out" / "loss.png" and png.read_bytes().startswith(PNG_SIGNATURE)


def test_without_matplotlib_the_loss_curve_is_skipped_with_one_sentence(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path / "metrics.csv", [{"epoch": 0, "step": 0, "train_loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert quickstart.save_loss_curve(tmp_path / "metrics.csv", tmp_path / "loss.png") is None
    out = capsys.readouterr().out.strip()
    assert out == "matplotlib is not installed, so no loss curve was drawn; install it with `pip install matplotlib`."
    assert not (tmp_path / "loss.png").exists()
