#!/usr/bin/env python
"""How the sparse presets' training cost grows with the sequence (issue 15, target 5): step time and peak memory
of fwd+bwd+AdamW at 4k, 8k, 16k and 32k tokens per step, and the ratio of ratios against linear growth
((cost at L / cost at 4k) / (L / 4k); 1.00 = exactly linear, the target is at most 1.15 at 32k).

Each point is one `benchmarks/train_throughput.py` worker process (real enwik8-sample bytes, batch 1, the
issue's size: 4 layers, d=256, 4 heads; window 256, blocks of 64, LSH chunks of 64, 2 routed layers of 4).

    python benchmarks/sparse_growth.py [--presets longformer bigbird reformer routing] [--lengths 4096 8192 16384 32768]

Writes benchmarks/results/sparse-growth-cpu.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--layers", "4", "--hidden", "256", "--heads", "4", "--inner", "1024", "--vocab", "259"]
MECHANISM = {
    "longformer": ["--set", "attention_window=256"],
    "bigbird": ["--set", "block_size=64", "--set", "num_random_blocks=3"],
    "reformer": ["--set", "lsh_chunk_length=64", "--set", "num_buckets=64", "--set", "feed_forward_chunk_size=1024"],
    "routing": ["--set", "attention_window=256", "--set", 'layer_mixers=["sliding","sliding","routing","routing"]',
                "--set", "num_clusters=16", "--set", "num_routing_heads=2"],
}


def measure(preset: str, length: int, steps: int, warmup: int) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--preset", preset, *SIZE,
               *MECHANISM.get(preset, []), "--dropout", "0", "--attn-dropout", "0", "--seq-lens", str(length),
               "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["results"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(MECHANISM), choices=list(MECHANISM))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        for length in args.lengths:
            row = measure(preset, length, args.steps, args.warmup)
            row = {"preset": preset, "tokens": length, "step_ms": row["step_ms_median"], "peak_mem_mb": row["peak_mem_mb"],
                   "tokens_per_s": row["tokens_per_s"], "params": row["params"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = args.lengths[0]
    lines = ["# Sparse presets: cost growth from 4k to 32k tokens per step", "",
             f"Date: {datetime.date.today()}. Machine: 2 CPU threads ({platform.machine()}). "
             f"Command: `python benchmarks/sparse_growth.py {' '.join(sys.argv[1:])}`.", "",
             "Step time (median of the timed steps) and peak RSS growth of a fresh process (model, optimizer and "
             f"activations); growth = (cost at L / cost at {base}) / (L / {base}): 1.00 is linear, the target is <= 1.15.",
             "", "| preset | tokens | step ms | time growth vs linear | peak MB | memory growth vs linear |",
             "|---|---|---|---|---|---|"]
    for preset in args.presets:
        first = next(r for r in rows if r["preset"] == preset and r["tokens"] == base)
        for r in (r for r in rows if r["preset"] == preset):
            scale = r["tokens"] / base
            r["time_growth"] = r["step_ms"] / first["step_ms"] / scale
            r["memory_growth"] = r["peak_mem_mb"] / first["peak_mem_mb"] / scale
            lines.append(f"| {preset} | {r['tokens']} | {r['step_ms']:.0f} | {r['time_growth']:.2f} | "
                         f"{r['peak_mem_mb']:.0f} | {r['memory_growth']:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "sparse-growth-cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.results / "sparse-growth-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
