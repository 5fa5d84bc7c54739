"""Extractive QA end to end: load a folder, run every window of every example, merge, score.

`scripts/evaluate_qa.py` and the fine-tuning module's validation share this, so the numbers a run logs are
the numbers the script prints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longlm.configuration_longlm import LongLMConfig
from longlm.data.encoder_tokens import require_fast, with_encoder_tokens
from longlm.data.qa import QAExample, QAFeatures, collate, featurize, postprocess
from longlm.evaluation.qa_metrics import score_predictions
from longlm.evaluation.strict_loading import load_exactly

QA_HEAD = "qa_outputs."  # the span head's parameters (LongLMForQuestionAnswering.qa_outputs)
LM_HEAD = "lm_head."  # a pretrained causal or masked LM's head, which QA does not use


def load_qa_model(path: str | Path, **config_overrides: Any):
    """(QA model, tokenizer) from any longlm HF folder: a QA fine-tune, a masked-LM or a decoder checkpoint
    (their backbones carry over and the span head starts fresh), or a folder from scripts/convert_hf.py.

    The tokenizer gets the encoder tokens and pair template where it lacks them (`with_encoder_tokens`); when
    that grows the vocabulary the embeddings grow with it, and the config learns the separator id that
    puts global attention on the question."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"Model folder '{path}' has no config.json; expected a folder written by pretrain.py (hf/), export.py, "
            "finetune_qa.py or convert_hf.py."
        )
    import longlm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = with_encoder_tokens(require_fast(AutoTokenizer.from_pretrained(path), f"Question answering with '{path}'"))
    # the span head starts fresh on a pretrained LM; a QA fine-tune must bring its own
    fine_tuned = any(name.endswith("ForQuestionAnswering") for name in _architectures(path))
    LongLMConfig.refuse_unknown_keys(config_overrides)  # from_pretrained would drop a typo without a word
    fresh, behind = ((), ()) if fine_tuned else ((QA_HEAD,), (LM_HEAD,))
    model = load_exactly(AutoModelForQuestionAnswering, path, may_start_fresh=fresh, may_leave_behind=behind, **config_overrides)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for name in ("sep_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    return model, tokenizer


def _architectures(path: Path) -> list[str]:
    return json.loads((path / "config.json").read_text()).get("architectures") or []


@torch.no_grad()
def feature_logits(model, features: QAFeatures, batch_size: int, pad_token_id: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start/end logits of every feature (unpadded, float32 numpy), in feature order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    try:
        for first in range(0, len(features), batch_size):
            items = [features[i] for i in range(first, min(first + batch_size, len(features)))]
            batch = collate(items, pad_token_id)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            for row, item in enumerate(items):
                length = len(item["input_ids"])
                starts.append(out.start_logits[row, :length].float().cpu().numpy())
                ends.append(out.end_logits[row, :length].float().cpu().numpy())
    finally:
        model.train(was_training)
    return starts, ends


def evaluate_examples(
    model,
    tokenizer,
    examples: list[QAExample],
    *,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    n_best: int | None = None,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
    truncate: bool = False,
) -> dict[str, Any]:
    """Predictions (official SQuAD format), null odds, metrics and feature statistics for `examples`
    (`truncate`: only each example's first window is read, see `featurize`)."""
    features = featurize(examples, tokenizer, max_length=max_length, stride=stride, training=False, truncate=truncate)
    starts, ends = feature_logits(model, features, batch_size, tokenizer.pad_token_id)
    version_2 = any(example.is_impossible for example in examples)
    predictions, null_odds = postprocess(
        examples, features, starts, ends, n_best=n_best, max_answer_length=max_answer_length,
        null_threshold=null_threshold, version_2=version_2,
    )
    metrics = score_predictions(examples, predictions, na_probs=None)
    return {"predictions": predictions, "null_odds": null_odds, "metrics": metrics, "features": features.stats.as_dict()}
