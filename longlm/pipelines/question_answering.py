"""`pipeline("question-answering", model=DIR)` for long documents.

transformers 5 dropped its extractive question-answering pipeline (the task now raises "has been removed").
longlm registers this one under the same name on import, unless the installed transformers still has its
own. It takes HF's arguments and returns HF's answer dict, and does the work with longlm's QA code: the
windows are `featurize`'s (one window when question + context fit in `max_seq_len`, strided otherwise),
and the span search is the one `scripts/evaluate_qa.py` uses.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, Pipeline

from longlm.data.qa_spans import best_span, top_spans

TASK = "question-answering"


class ExtractiveQuestionAnsweringPipeline(Pipeline):
    """`qa(question=..., context=...)` -> {"score", "start", "end", "answer"} (character offsets in context).

    Parameters (HF's names): max_seq_len (tokens per window, default 4096), doc_stride (tokens shared by
    windows, default 128), max_answer_len (tokens, default 15), handle_impossible_answer (allow the empty
    answer when the null score wins, default False), top_k (default 1: one answer dict; k > 1: a list of the k
    best distinct answers, best first).
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, *args: Any, question: str | None = None, context: str | None = None, **kwargs: Any):
        if question is not None or context is not None:
            if question is None or context is None:
                raise ValueError("The question-answering pipeline needs both question= and context=.")
            return super().__call__({"question": question, "context": context}, **kwargs)
        return super().__call__(*args, **kwargs)

    def _sanitize_parameters(
        self,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        max_answer_len: int | None = None,
        handle_impossible_answer: bool | None = None,
        top_k: int | None = None,
        align_to_words: bool | None = None,
        **kwargs: Any,
    ):
        if align_to_words:
            raise ValueError(
                "The question-answering pipeline returns token-aligned answers; align_to_words=True is not supported, "
                "expected align_to_words=False or no value."
            )
        if kwargs:
            raise ValueError(
                f"The question-answering pipeline got unknown arguments {sorted(kwargs)}; expected max_seq_len, "
                "doc_stride, max_answer_len, handle_impossible_answer, top_k or align_to_words."
            )
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ValueError(f"The question-answering pipeline's top_k must be a positive integer, got {top_k!r}.")
        preprocess = {k: v for k, v in (("max_seq_len", max_seq_len), ("doc_stride", doc_stride)) if v is not None}
        postprocess = {
            k: v
            for k, v in (("max_answer_len", max_answer_len), ("handle_impossible_answer", handle_impossible_answer), ("top_k", top_k))
            if v is not None
        }
        return preprocess, {}, postprocess

    def preprocess(self, inputs: dict[str, str], max_seq_len: int = 4096, doc_stride: int = 128) -> dict[str, Any]:
        from longlm.data.qa import QAExample, collate, featurize  # data code loads only when the task runs

        if not isinstance(inputs, dict) or not {"question", "context"} <= set(inputs):
            raise ValueError("The question-answering pipeline takes question= and context= (or a dict with both).")
        example = QAExample(id="pipeline", question=inputs["question"], context=inputs["context"], answers=[])
        features = featurize([example], self.tokenizer, max_length=max_seq_len, stride=doc_stride, training=False)
        batch = collate([features[i] for i in range(len(features))], self.tokenizer.pad_token_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "features": features, "example": example}

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return {"start_logits": out.start_logits, "end_logits": out.end_logits, "features": inputs["features"], "example": inputs["example"]}

    def postprocess(
        self, outputs: dict[str, Any], max_answer_len: int = 15, handle_impossible_answer: bool = False, top_k: int = 1
    ) -> dict[str, Any] | list[dict[str, Any]]:
        if top_k > 1:
            return self._top_answers(outputs, max_answer_len, handle_impossible_answer, top_k)
        features, context = outputs["features"], outputs["example"].context
        best: dict[str, Any] = {"score": 0.0, "start": 0, "end": 0, "answer": ""}
        best_logit, null_logit = -np.inf, np.inf
        for row in range(len(features)):
            length = len(features.input_ids[row])
            start = outputs["start_logits"][row, :length].float().cpu().numpy()
            end = outputs["end_logits"][row, :length].float().cpu().numpy()
            offsets = features.offset_mapping.array(row)
            null_logit = min(null_logit, float(start[0] + end[0]))
            span = best_span(start, end, offsets[:, 0] >= 0, max_answer_len)
            if span is None or span[0] <= best_logit:
                continue
            best_logit, first, last = span
            # HF's score: the span's probability, start and end softmaxed over the window
            probability = float(torch.softmax(torch.from_numpy(start), 0)[first] * torch.softmax(torch.from_numpy(end), 0)[last])
            char_start, char_end = int(offsets[first, 0]), int(offsets[last, 1])
            best = {"score": probability, "start": int(char_start), "end": int(char_end), "answer": context[char_start:char_end]}
        if handle_impossible_answer and null_logit > best_logit:
            return {"score": 1.0, "start": 0, "end": 0, "answer": ""}
        return best


    def _top_answers(self, outputs: dict[str, Any], max_answer_len: int, handle_impossible_answer: bool, top_k: int) -> list[dict[str, Any]]:
        """HF's `top_k`: the best distinct answers over all windows, best first (ranked by start + end logit,
        as the single answer is), each with its span probability in its window; with
        `handle_impossible_answer` the empty answer competes with its null logit."""
        features, context = outputs["features"], outputs["example"].context
        ranked: dict[tuple[int, int], tuple[float, float]] = {}  # (char start, char end) -> (logit, probability)
        null = (-np.inf, 0.0)
        for row in range(len(features)):
            length = len(features.input_ids[row])
            start = outputs["start_logits"][row, :length].float().cpu().numpy()
            end = outputs["end_logits"][row, :length].float().cpu().numpy()
            p_start, p_end = (torch.softmax(torch.from_numpy(x), 0).numpy() for x in (start, end))
            offsets = features.offset_mapping.array(row)
            row_null = float(start[0] + end[0])
            if null[0] == -np.inf or row_null < null[0]:  # the null score is the minimum over windows
                null = (row_null, float(p_start[0] * p_end[0]))
            for logit, first, last in top_spans(start, end, offsets[:, 0] >= 0, max_answer_len, top_k):
                chars = (int(offsets[first, 0]), int(offsets[last, 1]))
                if chars not in ranked or logit > ranked[chars][0]:
                    ranked[chars] = (logit, float(p_start[first] * p_end[last]))
        answers = [
            {"score": probability, "start": s, "end": e, "answer": context[s:e], "_logit": logit}
            for (s, e), (logit, probability) in ranked.items()
        ]
        if handle_impossible_answer and np.isfinite(null[0]):
            answers.append({"score": null[1], "start": 0, "end": 0, "answer": "", "_logit": null[0]})
        answers.sort(key=lambda answer: -answer["_logit"])
        return [{k: v for k, v in answer.items() if k != "_logit"} for answer in answers[:top_k]]


def register_question_answering() -> None:
    """Register the task (transformers 5 lists it as removed; this takes the name back)."""
    from transformers import pipelines

    if TASK in pipelines.PIPELINE_REGISTRY.supported_tasks:
        return
    pipelines.REMOVED_TASKS.pop(TASK, None)
    pipelines.PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ExtractiveQuestionAnsweringPipeline, pt_model=AutoModelForQuestionAnswering, type="text"
    )
