#!/usr/bin/env python
"""Equal-budget quality: each memory preset vs the same model with its memory off, on real data.

Every run trains the repo's tiny config through scripts/pretrain.py for the same number of training segments
(same data order, same size), then scripts/evaluate.py scores the validation split; the table compares
validation bits per character with the memory on and off.

    python benchmarks/memory_quality.py --segments 600
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "enwik8-sample" / "enwiki_sample.xml"

# name -> (config, segments per step, overrides that switch the memory off but keep the model)
RUNS = {
    "transformer-xl": ("enwik8/transformer-xl-tiny.yaml", 1, ["memory=none", "mem_len=0"]),
    "compressive": ("enwik8/compressive-tiny.yaml", 1, ["memory=none", "mem_len=0", "cmem_len=0"]),
    "memorizing": ("enwik8/memorizing-tiny.yaml", 1, ["memory=none", "mem_len=0", "knn_layers=[]"]),
    "rmt": ("enwik8/rmt-tiny.yaml", 2, ["memory=none", "num_memory_tokens=0"]),
}


def run(args: list[str]) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(args)}")
    return result.stdout


def train_and_score(name: str, config: str, steps: int, overrides: list[str], out: Path, data: Path) -> dict:
    root = out / name
    started = time.time()
    run(
        [
            "scripts/pretrain.py", "fit", "--config", f"configs/{config}", "--data.path", str(data),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(root),
            *[arg for o in overrides for arg in ("--model.config." + o.split("=")[0], o.split("=", 1)[1])],
        ]
    )
    train_s = time.time() - started
    evaluation = run(
        ["scripts/evaluate.py", str(root / "hf"), "--dataset", "enwik8", "--path", str(data), "--split", "validation",
         "--tgt-len", "64", "--batch-size", "16"]
    )
    metrics = json.loads(evaluation.strip().splitlines()[-1])
    return {"run": name, "train_s": round(train_s, 1), "val_bpc": metrics["bits_per_character"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=600, help="training segments per run (the budget)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--only", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        config, per_step, off = RUNS[name]
        steps = args.segments // per_step
        on = train_and_score(f"{name}", config, steps, [], Path(args.out), Path(args.data))
        no = train_and_score(f"{name}-memory-off", config, steps, off, Path(args.out), Path(args.data))
        rows.append({"preset": name, "segments": args.segments, "bpc_memory_on": on["val_bpc"], "bpc_memory_off": no["val_bpc"],
                     "train_s_on": on["train_s"], "train_s_off": no["train_s"]})
        print(json.dumps(rows[-1]), flush=True)
    print("| preset | training segments | val bpc, memory on | val bpc, memory off | difference | train s (on / off) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['segments']} | {r['bpc_memory_on']:.4f} | {r['bpc_memory_off']:.4f} | "
              f"{r['bpc_memory_off'] - r['bpc_memory_on']:+.4f} | {r['train_s_on']} / {r['train_s_off']} |")
    print(json.dumps({"benchmark": "memory_quality", "command": " ".join(sys.argv), "rows": rows}))


if __name__ == "__main__":
    main()
