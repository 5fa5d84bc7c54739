"""benchmarks/train_throughput.py still runs (a smoke run at toy size; speed itself is never asserted)."""
import json
import subprocess
import sys

from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data


@requires_shared_data
def test_throughput_script_prints_a_json_result_on_real_bytes():
    args = [
        sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--preset", "transformer-xl", "--layers", "1",
        "--hidden", "32", "--heads", "2", "--inner", "64", "--seq-lens", "16", "--mem-len", "16", "--steps", "2",
        "--warmup", "1", "--threads", "1", "--data", str(ENWIK8_SAMPLE),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    text = json.dumps(summary)
    assert "tokens_per_s" in text and "peak" in text
