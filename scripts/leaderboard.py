#!/usr/bin/env python
"""Every decoder preset through the long-context suite and every encoder variant through needle QA, one
table per part and the pictures:

    python scripts/leaderboard.py --budget-minutes 15 [--presets full transformer-xl ...] \
        [--data ../shared/data/pg19-sample] [--device cpu|cuda] [--needle-variants longformer ...]

Trains each decoder preset with the same data, tokens and seed (configs/long_range/tiny.yaml: the token budget
is recipe.max_steps; --budget-minutes caps each preset's training time), then fine-tunes each needle-QA variant
(configs/needle_qa/tiny.yaml, the same minutes cap), then writes RESULTS/leaderboard.md, leaderboard.jsonl
and leaderboard-*.png. Resumable: a preset whose RUNS/<preset>/result.json (a variant whose
NEEDLE_RUNS/<variant>/needle_result.json) exists is not retrained.
"""
import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from longlm.evaluation.leaderboard import run_all, run_needle_variants, write_results
from longlm.evaluation.needle_qa import parse_needle
from longlm.presets import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, required=True, help="training minutes per preset, at most")
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS.names()), choices=sorted(PRESETS.names()))
    parser.add_argument("--data", nargs="+", default=None, help="haystack: text files and/or PG-19 folders (default: the config's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", default="configs/long_range/tiny.yaml")
    parser.add_argument("--runs", type=Path, default=Path("runs/leaderboard"), help="one folder per preset")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--needle-config", default="configs/needle_qa/tiny.yaml")
    parser.add_argument("--needle-variants", nargs="*", default=None, help="needle-QA variants (default: the config's; none: skip)")
    parser.add_argument("--needle-runs", type=Path, default=Path("runs/needle_qa"))
    parser.add_argument("--needle-override", action="append", default=[], dest="needle_overrides",
                        help="one more scripts/needle_qa.py option, e.g. --needle-override=--recipe.max_steps=300 (repeatable)")
    parser.add_argument("overrides", nargs="*", help="more scripts/long_range.py options, after --, e.g. -- --recipe.max_steps 500")
    args = parser.parse_args()
    if args.budget_minutes <= 0:
        parser.error(f"--budget-minutes must be positive, got {args.budget_minutes}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA device.")
    extra = list(args.overrides) + (["--haystack", json.dumps(args.data)] if args.data else [])
    results = run_all(args.presets, args.config, args.runs, args.device, args.budget_minutes, extra)
    needle_args = list(args.needle_overrides) + (["--haystack", json.dumps(args.data)] if args.data else [])
    variants = args.needle_variants
    if variants is None:
        variants = [v.name for v in parse_needle(["--config", args.needle_config, *needle_args])[1].variants]
    needle = run_needle_variants(variants, args.needle_config, args.needle_runs, args.budget_minutes, needle_args)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads ({platform.machine()})"
    header = (
        f"# Long-context leaderboard\n\nDate: {datetime.date.today()}. Machine: {machine}, torch {torch.__version__}. "
        f"Budget: {args.budget_minutes:g} training minutes per preset at most, recipe and sizes from `{args.config}`.\n"
        f"Command: `python scripts/leaderboard.py --budget-minutes {args.budget_minutes:g} --presets {' '.join(args.presets)}"
        f" --device {args.device}" + (f" --data {' '.join(args.data)}" if args.data else "") + (f" --needle-variants {' '.join(variants)}" if args.needle_variants is not None else "")
        + "".join(f" --needle-override={o}" for o in args.needle_overrides)
        + (f" -- {' '.join(args.overrides)}" if args.overrides else "") + "`"
    )
    write_results(results, args.results, header, needle)
    print(f"wrote {args.results / 'leaderboard.md'}")


if __name__ == "__main__":
    main()
