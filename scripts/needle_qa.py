#!/usr/bin/env python
"""Long-document QA with a needle for the encoder variants (longformer with and without global attention,
bigbird, full truncated to 512):

    python scripts/needle_qa.py --config configs/needle_qa/tiny.yaml [--variant longformer] [--runs runs/needle_qa]

Each variant is fine-tuned with scripts/finetune_qa.py's CLI and scored with evaluate_qa's code; its
RUNS/<variant>/needle_result.json holds EM/F1 per document length and per needle position. Resumable: a
variant with a result is not retrained. `scripts/leaderboard.py` runs this and tables the results.
"""
import sys
from pathlib import Path

from longlm.evaluation.needle_qa import parse_needle, run_needle
from longlm.training.quiet import silence_known_noise


def main() -> None:
    silence_known_noise()
    config, suite = parse_needle(sys.argv[1:])
    run_needle(suite, Path(config.runs), [config.variant] if config.variant else None)


if __name__ == "__main__":
    main()
