"""The Transformer-XL evaluation protocol: ordered segments, memory carried, every token scored once.

Evaluation may use a longer memory (`mem_len`), another segment length, `clamp_len` and `same_length`
than training did; they are set on the loaded model's config for the run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from longlm.data.corpus import CorpusSplit
from longlm.data.streams import SegmentStreams, memory_for_segment
from longlm.evaluation.strict_loading import load_exactly


def load_model_folder(path: str | Path):
    """(model, tokenizer) from an HF folder written by save_pretrained / export."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Model folder '{path}' does not exist.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Model folder '{path}' has no config.json; expected a folder written by export.py or by fit.")
    import longlm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return load_exactly(AutoModelForCausalLM, path), AutoTokenizer.from_pretrained(path)


def check_split_fills_a_segment(split: CorpusSplit, tgt_len: int, batch_size: int) -> None:
    """Refuse a split in which a stream holds less than one whole segment: the few tokens it would score
    give a number that looks like a result and is not one."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    tokens, needed = len(split.tokens), batch_size * (tgt_len + 1)
    if tokens < needed:
        raise ValueError(
            f"The {split.name} split has {tokens} tokens, fewer than one segment per stream: {batch_size} "
            f"stream(s) x (tgt_len {tgt_len} + 1) = {needed} tokens are needed; use a smaller tgt_len or "
            f"batch_size, or a longer split."
        )


@torch.no_grad()
def evaluate_stream(
    model,
    split: CorpusSplit,
    *,
    tgt_len: int,
    mem_len: int | None = None,
    batch_size: int = 1,
    clamp_len: int | None = None,
    same_length: bool | None = None,
    max_segments: int | None = None,
    carry_memory: bool = True,
    token_losses: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Total NLL (nats) over the split's ordered segments; returns the totals and counts.

    `carry_memory=False` feeds every segment without memory (the context is the segment alone).
    `token_losses=True` adds `token_nll` (nats per scored token) and `token_index` (the index in
    `split.tokens` of the token each one predicts), for losses by position in a document.
    `progress=True` shows a progress bar with the ETA on stderr (segments scored of those to score).
    """
    if tgt_len <= 0:
        raise ValueError(f"tgt_len must be a positive integer, got {tgt_len}.")
    if mem_len is not None and mem_len < 0:
        raise ValueError(f"mem_len must be a non-negative integer, got {mem_len}.")
    check_split_fills_a_segment(split, tgt_len, batch_size)
    asked = {"mem_len": mem_len, "clamp_len": clamp_len, "same_length": same_length}
    asked = {name: value for name, value in asked.items() if value is not None}
    saved = {name: getattr(model.config, name) for name in asked}
    model.with_memory(**asked)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        streams = SegmentStreams(split.tokens, batch_size, tgt_len, split.doc_starts, drop_last=False)
        total, count, memory = 0.0, 0, None
        nll_parts, index_parts = [], []
        total_segments = len(streams) if max_segments is None else min(max_segments, len(streams))
        indices = range(total_segments)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"evaluating {split.name}", unit="segment", mininterval=2.0)
        for index in indices:
            batch = streams.segment(index)
            memory = memory_for_segment(memory, batch) if carry_memory else None
            out = model(input_ids=batch["input_ids"].to(device), memory=memory, document_starts=batch["document_starts"].to(device))
            labels = batch["labels"].to(device)
            nll = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            total += nll.sum().item()
            count += labels.numel()
            memory = out.memory
            if token_losses:
                rows, width = labels.shape
                first = index * tgt_len + 1 + np.arange(rows)[:, None] * streams.stream_len
                nll_parts.append(nll.cpu().numpy())
                index_parts.append((first + np.arange(width)[None, :]).reshape(-1))
    finally:
        model.with_memory(**saved)
        model.train(was_training)
    result: dict[str, Any] = {"nll": total, "tokens_scored": count, "tokens_total": int(len(split.tokens))}
    if token_losses:
        result["token_nll"] = np.concatenate(nll_parts) if nll_parts else np.zeros(0, dtype=np.float32)
        result["token_index"] = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    return result


def lm_metrics(result: dict[str, Any], split: CorpusSplit, dataset: str) -> dict[str, float]:
    """Bits per character for byte corpora; word-level and token perplexity for subword corpora.

    When some tokens are not scored (several streams drop a remainder), the word count is scaled by the
    scored fraction so the per-word NLL stays an unbiased estimate.
    """
    nll, scored = result["nll"], result["tokens_scored"]
    metrics: dict[str, float] = {"loss": nll / scored, "tokens_scored": scored}
    if dataset == "enwik8":
        metrics["bits_per_character"] = nll / scored / math.log(2)
    else:
        fraction = scored / max(1, result["tokens_total"] - 1)
        metrics["word_perplexity"] = math.exp(nll / (split.num_words * fraction))
        metrics["token_perplexity"] = math.exp(nll / scored)
        metrics["words"] = split.num_words
    return metrics
