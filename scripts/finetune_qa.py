#!/usr/bin/env python
"""Fine-tune any longlm folder on extractive QA:

    python scripts/finetune_qa.py fit --config configs/qa/longformer-tiny.yaml --model.pretrained runs/.../hf
"""
from longlm.training.qa_cli import main

if __name__ == "__main__":
    main()
