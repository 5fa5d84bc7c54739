#!/usr/bin/env python
"""Checkpoint -> Hugging Face folder: `python scripts/export.py CKPT OUT_DIR`.

CKPT is a .ckpt file (single device, DDP) or a DeepSpeed checkpoint folder (ZeRO 1/2/3), whose shards are
first consolidated to fp32 with DeepSpeed's zero_to_fp32 (`--fp32-checkpoint FILE` keeps that file).
"""
import argparse

from longlm.training.export import export_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt written by scripts/pretrain.py (a folder under DeepSpeed)")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer into")
    parser.add_argument("--fp32-checkpoint", default=None, help="DeepSpeed only: also keep the consolidated fp32 .ckpt here")
    args = parser.parse_args()
    out = export_checkpoint(args.checkpoint, args.out_dir, fp32_checkpoint=args.fp32_checkpoint)
    print(f"Hugging Face folder written to {out}")


if __name__ == "__main__":
    main()
