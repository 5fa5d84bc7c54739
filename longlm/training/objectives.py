"""Training objectives: which head a pretraining run trains and what each segment becomes for it.

`model.task` in the YAML names one of `OBJECTIVES`; everything else (memory carried across segments, BPTT
through `bptt_depth` segments, per-rank state, checkpoints, resume) is the same loop for all of them.

* `causal`: `LongLMForCausalLM`, each token predicts the next one (the stream's `labels`).
* `mlm`: `LongLMForMaskedLM` (`is_decoder=False`), BERT masking of the segment (`longlm.training.masking`);
  its tokenizer needs the encoder tokens (`<mask>`, `<s>`), which the data module adds when told to.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from longlm.modeling_longlm import LongLMForCausalLM, LongLMForMaskedLM, LongLMPreTrainedModel
from longlm.registry import Registry
from longlm.training.masking import MaskingOptions, TokenMasker


class Objective:
    """Base class of `OBJECTIVES` entries."""

    model_class: ClassVar[type[LongLMPreTrainedModel]]
    # the data module's tokenizer must carry the encoder tokens (`with_encoder_tokens`)
    needs_encoder_tokens: ClassVar[bool] = False

    def __init__(self, name: str, masking: dict[str, Any] | None = None) -> None:
        if masking is not None:
            raise ValueError(f"model.masking is set but model.task is '{name}'; masking applies to task 'mlm' only.")
        self.name = name

    def config_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The `LongLMConfig` overrides this objective needs on top of the YAML's."""
        return overrides

    def model_inputs(self, batch: dict[str, Any], tokenizer, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """A segment from `SegmentStreams` -> `input_ids` and the targets the model's forward takes."""
        raise NotImplementedError

    @staticmethod
    def scored_tokens(inputs: dict[str, torch.Tensor]) -> int:
        """How many tokens the loss of `inputs` averages over (the weight of its logged loss)."""
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("task")


def build_objective(task: str, masking: dict[str, Any] | None = None) -> Objective:
    return OBJECTIVES.get(task)(task, masking)


def needs_encoder_tokens(task: str) -> bool:
    """For the CLI's link `model.task -> data.encoder_tokens`."""
    return OBJECTIVES.get(task).needs_encoder_tokens


@OBJECTIVES.register("causal")
class CausalObjective(Objective):
    model_class = LongLMForCausalLM

    def model_inputs(self, batch, tokenizer, generator):
        # targets already aligned with the inputs, so a segment's last token is trained on the next one's first
        return {"input_ids": batch["input_ids"], "shift_labels": batch["labels"]}

    @staticmethod
    def scored_tokens(inputs):
        return inputs["shift_labels"].numel()


@OBJECTIVES.register("mlm")
class MaskedLMObjective(Objective):
    model_class = LongLMForMaskedLM
    needs_encoder_tokens = True

    def __init__(self, name: str, masking: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.options = MaskingOptions.from_dict(masking)
        self._masker: TokenMasker | None = None
        self._masker_tokenizer = None

    def config_overrides(self, overrides):
        if overrides.get("is_decoder", False):
            raise ValueError(
                "model.task 'mlm' trains a bidirectional encoder, but model.config.is_decoder is true; "
                "expected is_decoder: false or no is_decoder at all."
            )
        return {**overrides, "is_decoder": False}

    def masker(self, tokenizer) -> TokenMasker:
        """The masker of `tokenizer` (built once per tokenizer: its tables come from the vocabulary)."""
        if tokenizer is None:
            raise ValueError(
                "Masked-LM training needs the tokenizer (for its mask and special tokens), but the module has none; "
                "expected it attached by the data module at fit start or set as module.tokenizer."
            )
        if self._masker_tokenizer is not tokenizer:
            self._masker, self._masker_tokenizer = TokenMasker(tokenizer, self.options), tokenizer
        return self._masker

    def model_inputs(self, batch, tokenizer, generator):
        input_ids, labels = self.masker(tokenizer)(batch["input_ids"], generator)
        return {"input_ids": input_ids, "labels": labels}

    @staticmethod
    def scored_tokens(inputs):
        return int((inputs["labels"] != -100).sum())


__all__ = ["OBJECTIVES", "Objective", "CausalObjective", "MaskedLMObjective", "build_objective", "needs_encoder_tokens"]
