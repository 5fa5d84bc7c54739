#!/usr/bin/env python
"""Train one decoder preset on the retrieval recipe and measure it (LightningCLI-style config + overrides):

    python scripts/long_range.py --config configs/long_range/tiny.yaml --preset transformer-xl \
        --output runs/long_range/transformer-xl [--haystack '[my_books/]'] [--recipe.max_minutes 5]

Writes OUTPUT/result.json (retrieval by distance, held-apart bits per byte, loss by context, budget) and
OUTPUT/hf (the trained model). The haystack can be any text file or PG-19 folder.
"""
import sys

from longlm.evaluation.suite import parse_suite, run_preset
from longlm.training.quiet import silence_known_noise


def main() -> None:
    config, suite = parse_suite(sys.argv[1:])
    silence_known_noise()
    run_preset(config.preset, suite, config.output, device=config.device, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
