#!/usr/bin/env python
"""Evaluate an HF folder with the Transformer-XL protocol; the last printed line is one JSON object.

    python scripts/evaluate.py MODEL_DIR --dataset enwik8 --path enwik8 --split test --tgt-len 80 --mem-len 2100
"""
import argparse
import json

import torch

from longlm.data.corpus import CORPORA
from longlm.evaluation.lm import evaluate_stream, lm_metrics, load_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--dataset", choices=CORPORA.names(), required=True)
    parser.add_argument("--path", required=True, help="enwik8 file (raw/zip/gz) or PG-19 folder")
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--tgt-len", type=int, default=128, help="segment length")
    parser.add_argument("--mem-len", type=int, default=None, help="memory length (default: the model's)")
    parser.add_argument("--clamp-len", type=int, default=None)
    parser.add_argument("--same-length", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1, help="streams; 1 scores every token")
    parser.add_argument("--max-segments", type=int, default=None, help="stop early (quick looks only)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    model, tokenizer = load_model_folder(args.model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    corpus = CORPORA.get(args.dataset)(args.path, cache_dir=args.cache_dir, tokenizer=tokenizer)
    split = corpus.split(args.split)
    result = evaluate_stream(
        model,
        split,
        tgt_len=args.tgt_len,
        mem_len=args.mem_len,
        batch_size=args.batch_size,
        clamp_len=args.clamp_len,
        same_length=args.same_length or None,
        max_segments=args.max_segments,
        progress=True,
    )
    metrics = lm_metrics(result, split, args.dataset)
    for key, value in metrics.items():
        print(f"{key:>20}: {value}")
    mem_len = model.config.mem_len if args.mem_len is None else args.mem_len
    print(json.dumps({"dataset": args.dataset, "split": args.split, "tgt_len": args.tgt_len, "mem_len": mem_len, **metrics}))


if __name__ == "__main__":
    main()
