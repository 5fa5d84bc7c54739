#!/usr/bin/env python
"""Hugging Face Longformer / BigBird folder -> longlm folder: `python scripts/convert_hf.py SRC DST`.

SRC is a folder written by transformers' save_pretrained (or downloaded from the Hub) holding a LongformerModel,
BigBirdModel or one of their masked-LM variants (LongformerForMaskedLM, BigBirdForMaskedLM,
BigBirdForPreTraining). DST gets config.json, model.safetensors, the model code (`trust_remote_code=True` loads
it without longlm installed) and SRC's tokenizer files; fine-tune it with longlm like any longlm folder.
"""
import argparse

from longlm.convert_hf import convert_hf_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the transformers folder (config.json + weights, tokenizer files if any)")
    parser.add_argument("dst", help="folder to write the longlm model and the copied tokenizer into")
    args = parser.parse_args()
    out = convert_hf_folder(args.src, args.dst)
    print(f"longlm folder written to {out}")


if __name__ == "__main__":
    main()
