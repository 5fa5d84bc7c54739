"""The README's main command runs as a user runs it (shortened to a few steps here)."""
import json
import subprocess
import sys


def test_main_command_trains_reloads_and_prints_a_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "longlm.quickstart", "--max-steps", "20", "--new-tokens", "40"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"LONGLM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "validation bits per character:" in out
    sample = out.split("----- sample -----")[1].split("------------------")[0]
    assert sample.strip().startswith("Anne Elliot") and len(sample.strip()) > len("Anne Elliot")
    summary = json.loads(out.strip().splitlines()[-1])
    assert (tmp_path / summary["hf_dir"] / "config.json").exists()
