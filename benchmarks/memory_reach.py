#!/usr/bin/env python
"""Why do `compressive` and `memorizing` not reach further than `transformer-xl` in the leaderboard? Five runs
of the same retrieval recipe (configs/long_range/tiny.yaml, the leaderboard's model size) that differ only in
memory, all trained on distances {0.5, 2} segments (curriculum: 0.5 first, then both) and scored at 0.5-4:

- xl-64:               transformer-xl, mem_len 64 (the leaderboard's; 2 segments only through two hops)
- xl-192:              transformer-xl, mem_len 192 (the key 2 segments back is directly attendable)
- compressive-rate-1:  compressive, mem_len 64, cmem_len 128, compression_rate 1 (cmem path, nothing lost)
- compressive-rate-4:  compressive, mem_len 64, cmem_len 64, compression_rate 4 (the leaderboard's)
- memorizing:          memorizing, mem_len 64 + its kNN store (the leaderboard's; the key is beyond mem_len)

If xl-192 and rate 1 recall at 2 segments and rate 4 does not, the compression (4 byte states into one,
trained only by attention reconstruction, never by the task) is what loses the key; if neither recalls,
the optimisation is; memorizing tells the same for a store read by kNN.
Writes benchmarks/results/memory-reach-cpu.{md,jsonl,png}.

    python benchmarks/memory_reach.py [--max-steps 2000] [--variants xl-192 ...]
"""
import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch

from longlm.evaluation.leaderboard import _save_figure
from longlm.evaluation.suite import load_suite, run_preset
from longlm.training.quiet import silence_known_noise

VARIANTS = {
    "xl-64": ("transformer-xl", {"mem_len": 64}),
    "xl-192": ("transformer-xl", {"mem_len": 192}),
    "compressive-rate-1": ("compressive", {"mem_len": 64, "cmem_len": 128, "compression_rate": 1}),
    "compressive-rate-4": ("compressive", {"mem_len": 64, "cmem_len": 64, "compression_rate": 4}),
    "memorizing": ("memorizing", {"mem_len": 64}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/long_range/tiny.yaml")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=Path, default=Path("runs/memory_reach"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    silence_known_noise()
    rows = []
    for name in args.variants:
        preset, memory = VARIANTS[name]
        base = load_suite(args.config)
        recipe = dataclasses.replace(base.recipe, train_distances=[0.5, 2.0], eval_distances=[0.5, 1, 2, 4], max_steps=args.max_steps)
        suite = dataclasses.replace(base, mechanism={**base.mechanism, **memory}, recipe=recipe, lm_eval={}, context_mem_lens=[])
        result = run_preset(preset, suite, args.runs / name, log=lambda line: print(line, flush=True))
        answer = [r["answer_loss"] for r in result["training"]["history"] if r["answer_loss"] is not None]
        rows.append({
            "variant": name, "preset": preset, "memory": memory,
            "exact_match": {f"{r['distance_segments']:g}": r["exact_match"] for r in result["retrieval"]},
            "digit_accuracy": {f"{r['distance_segments']:g}": r["digit_accuracy"] for r in result["retrieval"]},
            "final_answer_loss": answer[-1] if answer else None,
            "steps": result["training"]["steps"], "stopped_by": result["training"]["stopped_by"],
            "minutes": result["training"]["seconds"] / 60,
        })
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    distances = list(rows[0]["exact_match"])
    lines = [
        "# Reach beyond the XL memory: compression, kNN store, or optimisation?", "",
        f"Date: {datetime.date.today()}. Machine: {torch.get_num_threads()} CPU threads ({platform.machine()}), torch {torch.__version__}.",
        f"Command: `python benchmarks/memory_reach.py --max-steps {args.max_steps}`. Recipe and size: `{args.config}`, "
        "trained on distances {0.5, 2} segments of 64 tokens (0.5 first, then both), batch 16.", "",
        "| variant | memory | " + " | ".join(f"exact @{d}" for d in distances) + " | " + " | ".join(f"digit @{d}" for d in distances)
        + " | final answer loss | steps | minutes |",
        "|---" * (2 + 2 * len(distances) + 3) + "|",
    ]
    for row in rows:
        memory = ", ".join(f"{k} {v}" for k, v in row["memory"].items())
        lines.append(
            f"| {row['variant']} | {memory} | " + " | ".join(f"{row['exact_match'][d]:.2f}" for d in distances) + " | "
            + " | ".join(f"{row['digit_accuracy'][d]:.2f}" for d in distances)
            + f" | {row['final_answer_loss']:.3f} | {row['steps']} ({row['stopped_by']}) | {row['minutes']:.1f} |"
        )
    lines += ["", "Chance: exact 1e-05, digit 0.10.", "", "![memory-reach-cpu.png](memory-reach-cpu.png)", ""]
    (args.results / "memory-reach-cpu.md").write_text("\n".join(lines))
    (args.results / "memory-reach-cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def draw(ax) -> None:
        for row in rows:
            ax.plot([float(d) for d in distances], [row["exact_match"][d] for d in distances], marker="o", label=row["variant"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distance (segments of 64 tokens)")
        ax.set_ylabel("exact match")
        ax.set_title("Recall by distance: kinds of memory at the leaderboard's size")
        ax.legend()

    _save_figure(args.results / "memory-reach-cpu.png", draw)
    print((args.results / "memory-reach-cpu.md").read_text())


if __name__ == "__main__":
    main()
