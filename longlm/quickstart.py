"""The main command: `python -m longlm.quickstart` (no arguments, no download).

Trains a tiny Transformer-XL on the public-domain book bundled with longlm, reports validation bits per
character, writes the Hugging Face folder, reloads it with `AutoModelForCausalLM` and prints a sample.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent / "quickstart.yaml"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--prompt", default="Anne Elliot ")
    parser.add_argument("--new-tokens", type=int, default=300)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlm.evaluation.lm import evaluate_stream, lm_metrics
    from longlm.training.cli import main as cli_main

    cli_args = ["fit", "--config", str(CONFIG)]
    if args.max_steps is not None:
        cli_args += ["--trainer.max_steps", str(args.max_steps)]
    cli = cli_main(cli_args)
    hf_dir = Path(cli.trainer.default_root_dir) / "hf"

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    datamodule = cli.datamodule
    split = datamodule.eval_split("validation")
    result = evaluate_stream(model, split, tgt_len=datamodule.eval_tgt_len, batch_size=datamodule.eval_batch_size)
    metrics = lm_metrics(result, split, "enwik8")
    print(f"validation bits per character: {metrics['bits_per_character']:.3f}")
    print(f"Hugging Face folder: {hf_dir} (reloaded with AutoModelForCausalLM)")

    torch.manual_seed(0)
    prompt = tokenizer(args.prompt, add_special_tokens=False, return_tensors="pt").input_ids
    generated = model.generate(
        prompt, max_new_tokens=args.new_tokens, do_sample=True, top_k=20, temperature=0.8, pad_token_id=tokenizer.pad_token_id
    )
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    print("----- sample -----")
    print(text)
    print("------------------")
    summary = {"validation_bits_per_character": metrics["bits_per_character"], "hf_dir": str(hf_dir), "sample": text}
    print(json.dumps({k: v for k, v in summary.items() if k != "sample"}))
    return summary


if __name__ == "__main__":
    main()
