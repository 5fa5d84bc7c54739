#!/usr/bin/env python
"""Score an HF folder on SQuAD v1.1/v2.0 or TriviaQA; the last printed line is one JSON object.

    python scripts/evaluate_qa.py MODEL_DIR --data ../shared/data/qa/long-dev.json --max-length 4096 --output-dir preds/

Writes `predictions.json` ({id: answer}, the official SQuAD format; "" = no answer) and `null_odds.json`
({id: null score - best span score}, the official script's --na-prob-file) to --output-dir.
"""
import argparse
import json
from pathlib import Path

import torch

from longlm.data.qa import load_qa_examples
from longlm.evaluation.qa import evaluate_examples, load_qa_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--data", required=True, help="SQuAD-format JSON, or TriviaQA (official or SQuAD-style)")
    parser.add_argument("--format", choices=["auto", "squad", "triviaqa"], default="auto")
    parser.add_argument("--evidence-dir", default=None, help="TriviaQA evidence folder (official format)")
    parser.add_argument("--max-length", type=int, default=4096, help="tokens per window")
    parser.add_argument("--stride", type=int, default=256, help="tokens shared by consecutive windows")
    parser.add_argument("--truncate", action="store_true", help="read only the first window of each example")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--n-best", type=int, default=None, help="HF run_qa's candidate cut (default: every span)")
    parser.add_argument("--max-answer-length", type=int, default=30, help="tokens")
    parser.add_argument("--null-threshold", type=float, default=0.0, help="predict no answer when null - best > this")
    parser.add_argument("--max-examples", type=int, default=None, help="first N examples only (quick looks)")
    parser.add_argument("--seed", type=int, default=0, help="seeds a span head that the folder does not have")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_qa_model(args.model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    examples = load_qa_examples(args.data, format=args.format, evidence_dir=args.evidence_dir)
    if args.max_examples is not None:
        examples = examples[: args.max_examples]
    result = evaluate_examples(
        model, tokenizer, examples, max_length=args.max_length, stride=args.stride, batch_size=args.batch_size,
        n_best=args.n_best, max_answer_length=args.max_answer_length, null_threshold=args.null_threshold, truncate=args.truncate,
    )
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(result["predictions"], indent=1, ensure_ascii=False))
        (out / "null_odds.json").write_text(json.dumps(result["null_odds"], indent=1))
        print(f"predictions written to {out / 'predictions.json'}")
    for key, value in {**result["metrics"], **result["features"]}.items():
        print(f"{key:>28}: {value}")
    print(json.dumps({"model": str(args.model_dir), "data": str(args.data), "max_length": args.max_length,
                      "truncate": args.truncate, **result["metrics"], "features": result["features"]}))


if __name__ == "__main__":
    main()
