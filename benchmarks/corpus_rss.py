#!/usr/bin/env python
"""Peak memory of evaluation and training as the corpus grows (issue 15, target 4): a 10 MB and a 100 MB byte
file, built by concatenating the real samples (the enwik8-style Wikipedia XML, then PG-19 books, repeated),
each run in a fresh process with a fresh cache, so the streamed cache build (`longlm.data.enwik8`) is measured
too. Peak RSS is the child's `ru_maxrss` (os.wait4), which counts every page it touched, memory-mapped ones
included.

    python benchmarks/corpus_rss.py [--sizes-mb 10 100] [--train-steps 30]

Writes benchmarks/results/corpus-rss-cpu.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def build_corpus(path: Path, size: int) -> None:
    """`size` bytes of real text: the Wikipedia sample, then PG-19 books, repeated in order until full."""
    sources = [SHARED / "enwik8-sample" / "enwiki_sample.xml", *sorted((SHARED / "pg19-sample").glob("*/*.txt"))]
    written = 0
    with path.open("wb") as out:
        while written < size:
            for source in sources:
                data = source.read_bytes()[: size - written]
                out.write(data)
                written += len(data)
                if written >= size:
                    break


def tiny_model(folder: Path) -> None:
    """A small transformer-xl folder with its byte tokenizer (what scripts/evaluate.py loads)."""
    from transformers import ByT5Tokenizer

    from longlm import LongLMConfig, LongLMForCausalLM

    config = LongLMConfig.from_preset("transformer-xl", num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                      intermediate_size=128, mem_len=64, vocab_size=259)
    LongLMForCausalLM(config).save_pretrained(folder)
    ByT5Tokenizer(extra_ids=0).save_pretrained(folder)


def peak_rss_mb(command: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process; its output goes to `log`."""
    start = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}.")
    return usage.ru_maxrss / 1024.0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (fresh cache each); the median is reported")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_model(tmp / "model")
        for size in args.sizes_mb:
            corpus = tmp / f"corpus-{size}MB.raw"
            build_corpus(corpus, size * 1_000_000)
            evaluate = [sys.executable, "scripts/evaluate.py", str(tmp / "model"), "--dataset", "enwik8", "--path",
                        str(corpus), "--split", "test", "--tgt-len", "512", "--batch-size", "8",
                        "--cache-dir", str(tmp / f"cache-eval-{size}")]
            train = [sys.executable, "scripts/pretrain.py", "fit", "--config", "configs/enwik8/transformer-xl-tiny.yaml",
                     "--data.path", str(corpus), "--data.cache_dir", str(tmp / f"cache-train-{size}"),
                     "--trainer.max_steps", str(args.train_steps), "--trainer.limit_val_batches", "0",
                     "--trainer.default_root_dir", str(tmp / f"run-{size}")]
            for kind, command in (("evaluate (test split, every token)", evaluate), (f"train ({args.train_steps} steps)", train)):
                runs = []
                for repeat in range(args.repeats):
                    # a fresh cache and run folder each time (a second fit into the same folder would resume)
                    fresh = [f"{part}-{repeat}" if part.startswith((str(tmp / "cache-"), str(tmp / "run-"))) else part
                             for part in command]
                    runs.append(peak_rss_mb(fresh, tmp / f"{kind.split()[0]}-{size}.log"))
                rss = sorted(r[0] for r in runs)
                row = {"corpus_mb": size, "run": kind, "peak_rss_mib": rss[len(rss) // 2], "peak_rss_mib_all": rss,
                       "seconds": sorted(r[1] for r in runs)[len(runs) // 2]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "corpus-rss-cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["# Peak memory vs corpus size", "",
             f"Date: {datetime.date.today()}. Machine: {os.cpu_count()} CPU threads ({platform.machine()}). "
             f"Command: `python benchmarks/corpus_rss.py {' '.join(sys.argv[1:])}`.", "",
             "Byte corpora built by concatenating the real samples; fresh cache per run (the streamed build is "
             f"included); peak RSS of the whole process (torch included), median of {args.repeats} runs "
             "(the runs' spread, in the JSONL, is tens of MiB whatever the corpus).", "",
             "| run | " + " | ".join(f"{s} MB: peak RSS MiB (s)" for s in args.sizes_mb) + " | largest / smallest |",
             "|---|" + "---|" * (len(args.sizes_mb) + 1)]
    for kind in dict.fromkeys(r["run"] for r in rows):
        cells = {r["corpus_mb"]: r for r in rows if r["run"] == kind}
        ratio = cells[max(cells)]["peak_rss_mib"] / cells[min(cells)]["peak_rss_mib"]
        lines.append(f"| {kind} | " + " | ".join(f"{cells[s]['peak_rss_mib']:.0f} ({cells[s]['seconds']:.0f})" for s in args.sizes_mb)
                     + f" | {ratio:.3f} |")
    (args.results / "corpus-rss-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
