#!/usr/bin/env python
"""Lightning checkpoint -> Hugging Face folder: `python scripts/export.py CKPT OUT_DIR`."""
import argparse

from longlm.training.export import export_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt written by scripts/pretrain.py")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer into")
    args = parser.parse_args()
    print(f"Hugging Face folder written to {export_checkpoint(args.checkpoint, args.out_dir)}")


if __name__ == "__main__":
    main()
