"""Retrieval across segments: train a decoder preset on planted facts in real text, then score exact recall
by distance.

The recipe (one for every preset, `RetrievalRecipe`): the decoder reads segment-recurrent streams of
documents, each a haystack slice that either carries a planted fact recalled at its end
(`longlm.data.planted.retrieval_example`) or nothing (plain LM, a `lm_fraction` share). The loss is the LM
loss over every token plus `answer_weight` times the mean cross-entropy of the answer digits. The training
distances follow a curriculum: stage k of `len(train_distances)` equal stages draws distances from the first
k of them (RMT's authors grow the number of segments the same way). Memory is carried and reset exactly
as in pretraining (`CausalLMPretraining.forward_segments`, BPTT through `bptt_depth` segments).

Scoring is teacher-forced over the same segments: an example counts as recalled when the argmax at every
answer digit is that digit, which is exactly when greedy generation after the query writes the key (generate
equals the training-time forward). Chance is 10**-key_digits exact match and 0.1 per digit.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from longlm.evaluation.recipe_fields import require_positive_ints
from longlm.data.planted import Haystack, PlantedStreams, example_length, example_segments, plain_document, retrieval_example
from longlm.data.streams import memory_for_segment
from longlm.training.schedule import warmup_cosine

EVAL_DISTANCES = (0.5, 1, 2, 4, 8, 16, 32)


@dataclass
class RetrievalRecipe:
    """What the task is and how every preset trains on it (the same for all, so results compare).

    seg_len: tokens per segment (the model's `tgt_len`); distances are counted in these.
    train_distances: the curriculum's distances, in segments, in the order they are added.
    eval_distances: distances scored after training.
    num_facts / key_digits: facts planted per example (one queried) and digits per key.
    lm_fraction: share of training documents with nothing planted (plain LM on the haystack).
    answer_weight: weight of the answer digits' mean cross-entropy next to the LM loss.
    batch_size, learning_rate, warmup_steps, weight_decay, max_steps, max_minutes: optimisation. `max_steps`
        counts segments per row, so the token budget is max_steps x batch_size x seg_len for every preset: a
        BPTT step through k segments (RMT) is one optimizer step that consumes k of them. Training stops at
        that budget or after `max_minutes`, whichever comes first (the result says which).
    eval_examples: examples per distance; seed: data and initialisation.
    """

    seg_len: int = 64
    train_distances: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    eval_distances: list[float] = field(default_factory=lambda: list(EVAL_DISTANCES))
    num_facts: int = 1
    key_digits: int = 5
    lm_fraction: float = 0.25
    answer_weight: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_steps: int = 2000
    max_minutes: float = 15.0
    eval_examples: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, ("seg_len", "num_facts", "key_digits", "batch_size", "max_steps", "eval_examples"))
        if not 0.0 <= self.lm_fraction < 1.0:
            raise ValueError(f"RetrievalRecipe.lm_fraction must be in [0, 1), got {self.lm_fraction!r}.")
        if not self.train_distances or not self.eval_distances:
            raise ValueError("RetrievalRecipe.train_distances and eval_distances must each name at least one distance.")
        if self.max_minutes <= 0 or self.learning_rate <= 0 or self.answer_weight < 0:
            raise ValueError("RetrievalRecipe.max_minutes and learning_rate must be positive and answer_weight non-negative.")

    def stage(self, segment: int) -> int:
        """How many of `train_distances` the curriculum draws from after `segment` segments (1 .. all)."""
        stages = len(self.train_distances)
        return min(stages, 1 + segment * stages // max(1, self.max_steps))


def training_documents(recipe: RetrievalRecipe, haystack: Haystack, step_of: Callable[[], int]):
    """`draw(rng)` for `PlantedStreams`: a planted example at a curriculum distance, or a plain document."""

    def draw(rng: np.random.Generator):
        distances = recipe.train_distances[: recipe.stage(step_of())]
        distance = float(distances[int(rng.integers(0, len(distances)))])
        if rng.random() < recipe.lm_fraction:
            tokens = round(distance * recipe.seg_len)
            return plain_document(haystack, rng, example_length(tokens, recipe.seg_len, recipe.key_digits, recipe.num_facts))
        return retrieval_example(
            haystack, rng, seg_len=recipe.seg_len, distance=distance, num_facts=recipe.num_facts, key_digits=recipe.key_digits
        )

    return draw


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy of the answer digits in this segment (None when it holds none)."""
    mask = answer_mask.to(logits.device)
    if not bool(mask.any()):
        return None
    return F.cross_entropy(logits[mask].float(), labels.to(logits.device)[mask])


def train_retrieval(module, recipe: RetrievalRecipe, haystack: Haystack, log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train `module` (a `CausalLMPretraining`) on the recipe; returns the run's budget and loss history."""
    model = module.model
    device = next(model.parameters()).device
    torch.manual_seed(recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=recipe.learning_rate
    )
    step = 0  # optimizer steps (of `depth` segments each)
    depth = module.segments_per_step
    total_steps = max(1, recipe.max_steps // depth)
    streams = PlantedStreams(training_documents(recipe, haystack, lambda: step * depth), recipe.batch_size, recipe.seg_len, recipe.seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps // depth, total_steps, 0.1))
    module.train()
    memory, history, start = None, [], time.perf_counter()
    lm_sum = answer_sum = 0.0
    answer_count = window = 0
    stopped_by = "max_steps"
    while step < total_steps:
        if time.perf_counter() - start > recipe.max_minutes * 60:
            stopped_by = "max_minutes"
            break
        segments = [streams.next_segment() for _ in range(depth)]
        segments = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in s.items()} for s in segments]
        outs, memory = module.forward_segments(segments, memory)
        losses = []
        for out, batch in zip(outs, segments):
            extra = answer_loss(out.logits, batch["labels"], batch["answer_mask"])
            losses.append(out.loss if extra is None else out.loss + recipe.answer_weight * extra)
            lm_sum += float(out.lm_loss.detach())
            if extra is not None:
                answer_sum, answer_count = answer_sum + float(extra.detach()), answer_count + 1
        loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        window += depth
        if step % 50 == 0 or step == total_steps:
            row = {
                "step": step,
                "tokens": step * depth * recipe.batch_size * recipe.seg_len,
                "seconds": round(time.perf_counter() - start, 2),
                "lm_bits_per_token": lm_sum / window / math.log(2),
                "answer_loss": answer_sum / answer_count if answer_count else None,
                "curriculum_stage": recipe.stage(step * depth),
            }
            history.append(row)
            if log is not None:
                log(row)
            lm_sum = answer_sum = 0.0
            answer_count = window = 0
    seconds = time.perf_counter() - start
    tokens = step * depth * recipe.batch_size * recipe.seg_len
    return {"steps": step, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            "stopped_by": stopped_by, "history": history}


@torch.no_grad()
def retrieval_accuracy(
    model,
    haystack: Haystack,
    recipe: RetrievalRecipe,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    seed: int = 1,
) -> list[dict[str, Any]]:
    """Exact-match and per-digit accuracy at every `recipe.eval_distances` on fresh examples drawn from
    `haystack` with `seed` (the same examples for every model that uses the same seed and haystack)."""
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
        params = list(model.parameters())
        device = device or (params[0].device if params else "cpu")
    rows = []
    try:
        for distance in recipe.eval_distances:
            rng = np.random.default_rng([seed, int(distance * 1000)])
            examples = [
                retrieval_example(haystack, rng, seg_len=recipe.seg_len, distance=distance, num_facts=recipe.num_facts,
                                  key_digits=recipe.key_digits)
                for _ in range(recipe.eval_examples)
            ]
            exact = digits = 0
            for begin in range(0, len(examples), batch_size):
                chunk = examples[begin : begin + batch_size]
                right = torch.zeros(len(chunk), dtype=torch.long)
                memory = None
                for batch in example_segments(chunk, recipe.seg_len):
                    memory = memory_for_segment(memory, batch)
                    out = model(input_ids=batch["input_ids"].to(device), memory=memory,
                                document_starts=batch["document_starts"].to(device))
                    memory = out.memory
                    hit = (out.logits.argmax(-1).cpu() == batch["labels"]) & batch["answer_mask"]
                    right += hit.sum(dim=1)
                exact += int((right == recipe.key_digits).sum())
                digits += int(right.sum())
            rows.append({
                "distance_segments": distance,
                "distance_tokens": round(distance * recipe.seg_len),
                "exact_match": exact / len(examples),
                "digit_accuracy": digits / (len(examples) * recipe.key_digits),
                "examples": len(examples),
                "chance_exact_match": 10.0 ** -recipe.key_digits,
                "chance_digit_accuracy": 0.1,
            })
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    return rows


def recipe_dict(recipe: RetrievalRecipe) -> dict[str, Any]:
    return asdict(recipe)


def reach_in_segments(rows: Sequence[dict[str, Any]], threshold: float = 0.9) -> float:
    """The longest distance up to which every scored distance reaches `threshold` exact match (0 if none)."""
    reach = 0.0
    for row in sorted(rows, key=lambda r: r["distance_segments"]):
        if row["exact_match"] < threshold:
            break
        reach = row["distance_segments"]
    return reach


__all__ = ["RetrievalRecipe", "train_retrieval", "retrieval_accuracy", "training_documents", "answer_loss",
           "reach_in_segments", "recipe_dict", "EVAL_DISTANCES"]
