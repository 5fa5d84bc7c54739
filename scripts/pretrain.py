#!/usr/bin/env python
"""Pretrain a longlm model: `python scripts/pretrain.py fit --config configs/enwik8/transformer-xl-tiny.yaml`."""
from longlm.training.cli import main

if __name__ == "__main__":
    main()
