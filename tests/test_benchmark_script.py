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


@requires_shared_data
def test_sparse_peer_comparison_script_runs_every_mechanism_at_toy_size():
    """Ours for all four sparse presets, and the HF peers (the lucidrains peers live only in the benchmark's
    own environment, so here they are recorded as failed imports, not errors)."""
    args = [
        sys.executable, str(REPO / "benchmarks" / "compare_sparse_peers.py"), "--layers", "1", "--dim", "32", "--heads", "2",
        "--ff-mult", "2", "--total-lens", "256", "--window", "32", "--block", "16", "--random-blocks", "1", "--chunk", "16",
        "--ff-chunk", "64", "--cluster-window", "64", "--steps", "1", "--warmup", "0", "--skip-memory", "--in-process",
        "--threads", "1", "--data", str(ENWIK8_SAMPLE),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "compare_sparse_peers"
    ours = {row["mechanism"] for row in summary["summary"] if row["impl"] == "longlm" and row["tokens_per_s"] > 0}
    assert ours == {"longformer", "bigbird", "reformer", "routing"}
    text = json.dumps(summary)
    for peer in ("hf-longformer", "hf-bigbird", "hf-reformer"):
        assert peer in text
