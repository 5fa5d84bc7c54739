"""`CausalLMPretraining`: segment-recurrent LM training of any longlm preset.

`task` picks the objective (`longlm.training.objectives`: `causal` next-token prediction, or `mlm` masked LM
with BERT masking); the loop is the same for every objective. Each training step feeds the next segment of
every stream and keeps the memory the model returns for the step after (the Transformer-XL recipe). With
`config.bptt_depth` k > 1 (RMT) a step feeds the next k segments, keeps the graph through the memory between
them, backpropagates their mean loss once and detaches the memory it carries to the next step; with
`replay_segments` each segment's activations are recomputed in backward from the memory it read (memory-replay
backpropagation), so activation memory is about one segment's whatever the depth. Checkpoints
carry that memory, the position in the streams, the RNG state and the tokenizer, so a resumed run takes
exactly the step an uninterrupted run would have taken and `scripts/export.py` can write an HF folder from
the checkpoint alone. Masked LM draws its masks from torch's global RNG in training (saved per rank with the
checkpoint, so a resumed run masks exactly as the uninterrupted one) and from a fixed-seed generator in
validation and test (the same masks in every pass and every run, so their losses compare).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import torch
from torch.utils.checkpoint import checkpoint

from longlm.configuration_longlm import LongLMConfig
from longlm.data.streams import memory_for_segment
from longlm.memory.base import MemoryState
from longlm.layers.recompute import flag_recomputation
from longlm.training.objectives import build_objective
from longlm.training.optim import adamw_with_warmup_cosine
from longlm.training.tokenizer_files import check_tokenizer_files, tokenizer_from_files, tokenizer_to_files

CONFIG_BOOKKEEPING = frozenset({"transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype"})
EVAL_MASKING_SEED = 0  # validation/test masks come from a generator seeded with this at each pass


class CausalLMPretraining(L.LightningModule):
    """LM pretraining module (causal or masked LM: the name predates `task`).

    Args:
        preset: a name from `longlm.presets.PRESETS`.
        config: `LongLMConfig` field overrides on top of the preset.
        vocab_size: set from the data module's tokenizer by the CLI.
        learning_rate, weight_decay, betas: AdamW.
        warmup_steps, min_lr_ratio: linear warmup then cosine decay to `min_lr_ratio * learning_rate`
            over the run's total steps.
        gradient_checkpointing: recompute each block in backward instead of keeping its activations
            (HF's activation checkpointing): less memory, about a third more compute.
        task: the objective, a name in `longlm.training.objectives.OBJECTIVES` (`causal`, `mlm`); `mlm`
            trains `LongLMForMaskedLM` and sets `is_decoder: false` (true is refused).
        masking: `mlm` only: `{probability: 0.15, whole_word: false}` (`longlm.training.masking`).
        replay_segments: keep only each segment's input memory and losses in training and recompute the segment
            in backward (memory-replay backpropagation, with the forward's dropout draws): the same gradients,
            activation memory of about one segment at any `bptt_depth`, about one more forward per segment.
    """

    def __init__(
        self,
        preset: str = "transformer-xl",
        config: dict[str, Any] | None = None,
        vocab_size: int = 259,
        learning_rate: float = 2.5e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        task: str = "causal",
        masking: dict[str, Any] | None = None,
        replay_segments: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.objective = build_objective(task, masking)
        overrides = self.objective.config_overrides(dict(config or {}))
        overrides["vocab_size"] = vocab_size
        self.model = self.objective.model_class(LongLMConfig.from_preset(preset, **overrides))
        if gradient_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
            getattr(self.model, "activation_checkpointing_enable", self.model.gradient_checkpointing_enable)()
        self.replay_segments = replay_segments
        self.train_memory: MemoryState | None = None
        self.eval_memory: MemoryState | None = None
        self.eval_generator: torch.Generator | None = None  # masking in validation/test; None in training
        self.next_train_segment = 0
        self.tokenizer = None  # attached by the data module at fit start, saved with checkpoints

    @property
    def segments_per_step(self) -> int:
        """Consecutive segments one training step takes (the data module groups them): `bptt_depth`."""
        return self.model.config.bptt_depth

    # --- steps -----------------------------------------------------------------------------------------
    def _segment_step(self, batch: dict[str, Any], memory: MemoryState | None, detach: bool = True):
        """Forward one segment as the objective prepares it; returns (output, memory for the next, model inputs)."""
        memory = memory_for_segment(memory, batch)
        inputs = self.objective.model_inputs(batch, self.tokenizer, None if self.training else self.eval_generator)
        inputs = {**inputs, "memory": memory, "document_starts": batch["document_starts"]}
        if self.replay_segments and self.training and torch.is_grad_enabled():
            out = checkpoint(self._losses_and_memory, inputs, use_reentrant=False, context_fn=flag_recomputation)
        else:
            out = self.model(**inputs)
        next_memory = out.memory.detach() if out.memory is not None and detach else out.memory
        return out, next_memory, inputs

    def _losses_and_memory(self, inputs: dict[str, Any]):
        """The model's output for one segment without its logits and hidden states: what a replayed segment
        keeps until backward (its losses and the memory it hands on), so no segment's activations outlive it."""
        out = self.model(**inputs)
        return type(out)(loss=out.loss, lm_loss=out.lm_loss, aux_losses=out.aux_losses, memory=out.memory)

    def forward_segments(self, segments: list[dict[str, Any]], memory: MemoryState | None):
        """Consecutive segments of the same streams with the memory kept in the graph between them (so the
        loss of the last one reaches the first through the memory); the memory after the last is detached."""
        outs = []
        for index, batch in enumerate(segments):
            out, memory, _ = self._segment_step(batch, memory, detach=index == len(segments) - 1)
            outs.append(out)
        return outs, memory

    def _log_losses(self, prefix: str, lm_loss: torch.Tensor, aux_losses: dict[str, torch.Tensor] | None, tokens: int) -> None:
        """LM loss (and bits per token) as `<prefix>_loss`; each auxiliary loss under its own name.

        Averaged over ranks (`sync_dist`): every rank scores the same number of tokens, so the mean of the
        ranks' losses is the loss of the global batch, the number single-device training would log.
        """
        self.log(f"{prefix}_loss", lm_loss, prog_bar=True, batch_size=tokens, sync_dist=True)
        self.log(f"{prefix}_bits_per_token", lm_loss / math.log(2), batch_size=tokens, sync_dist=True)
        for name, value in (aux_losses or {}).items():
            self.log(f"{prefix}_{name}", value, batch_size=tokens, sync_dist=True)

    def training_step(self, batch: dict[str, Any] | list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """One segment, or (with `bptt_depth` k > 1) a list of k consecutive segments whose mean loss is
        backpropagated once through the memory carried between them (truncated BPTT over k segments)."""
        if isinstance(batch, dict):
            out, self.train_memory, _ = self._segment_step(batch, self.train_memory)
            self.next_train_segment = batch["segment"] + 1
            self._log_losses("train", out.lm_loss, out.aux_losses, batch["labels"].numel())
            return out.loss
        outs, self.train_memory = self.forward_segments(batch, self.train_memory)
        self.next_train_segment = batch[-1]["segment"] + 1

        def mean(values) -> torch.Tensor:  # training segments all have tgt_len tokens, so this is the token mean
            return torch.stack(list(values)).mean()  # (masked LM: of segments with about the same masked count)

        aux = {name: mean(o.aux_losses[name] for o in outs) for name in outs[0].aux_losses or {}}
        tokens = sum(b["labels"].numel() for b in batch)
        self._log_losses("train", mean(o.lm_loss for o in outs), aux, tokens)
        return mean(o.loss for o in outs)

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> torch.Tensor | None:
        out, self.eval_memory, inputs = self._segment_step(batch, self.eval_memory)
        tokens = self.objective.scored_tokens(inputs)
        if tokens == 0:  # a short last segment may have no masked token: nothing to score, the memory still moves
            return None
        self._log_losses(prefix, out.lm_loss, out.aux_losses, tokens)
        return out.lm_loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def _start_eval_pass(self) -> None:
        """Every pass starts with no memory and the same masking draws (a private generator: the global RNG,
        which training masks and dropout draw on, is left as it was)."""
        self.eval_memory = None
        self.eval_generator = torch.Generator(device=self.device).manual_seed(EVAL_MASKING_SEED)

    def on_validation_epoch_start(self) -> None:
        self._start_eval_pass()

    def on_test_epoch_start(self) -> None:
        self._start_eval_pass()

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and self.tokenizer is None:
            self.tokenizer = datamodule.tokenizer
        if self.tokenizer is not None and len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but model.vocab_size is {self.model.config.vocab_size}; "
                "expected at least as many (the CLI links model.vocab_size from data.vocab_size)."
            )

    # --- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return adamw_with_warmup_cosine(self, self.model)

    # --- checkpoints --------------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: each owns its streams, so its memory, and its own RNG."""
        memory = None if self.train_memory is None else self.train_memory.to("cpu").to_dict()
        return {
            "train_memory": memory,
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_states": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["longlm"] = {
            "model_config": self.model.config.to_dict(),
            "next_train_segment": self.next_train_segment,
            "ranks": _gather_objects(self._rank_state()),
            "tokenizer_files": tokenizer_to_files(self.tokenizer) if self.tokenizer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("longlm")
        if state is None:
            return
        if state.get("tokenizer_files"):  # checked even when the data module's tokenizer is used instead
            check_tokenizer_files(state["tokenizer_files"])
        defaults = {f.name: f.default for f in dataclasses.fields(LongLMConfig) if f.default is not dataclasses.MISSING}
        changed = changed_model_fields(state["model_config"], self.model.config.to_dict(), defaults)
        if changed:
            raise ValueError(
                "The checkpoint was trained with " + ", ".join(changed) + "; loading it cannot change the model's "
                "configuration (resume with the --model values it was trained with, e.g. the run's YAML alone)."
            )
        self.next_train_segment = state["next_train_segment"]
        ranks = state.get("ranks") or [state]  # checkpoints from before multi-rank training kept one state
        rank, world = (0, len(ranks)) if self._trainer is None else (self.global_rank, self._trainer.world_size)
        if len(ranks) != world:
            raise ValueError(
                f"The checkpoint was written by {len(ranks)} ranks and this run has {world}; each rank owns its own "
                "streams and memory, so resume on the same number of devices."
            )
        mine = ranks[rank]
        memory = mine["train_memory"]
        self.train_memory = None if memory is None else self.model.model.memory.state_from_dict(memory)
        if self.train_memory is not None:
            self.train_memory = self.train_memory.to(self.device)
        torch.set_rng_state(mine["torch_rng_state"])
        if mine["cuda_rng_states"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda_rng_states"])
        files = state.get("tokenizer_files")
        if files and self.tokenizer is None:
            self.tokenizer = tokenizer_from_files(files)


def changed_model_fields(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """`field=saved (now current)` for each model config field a resumed run would change (bookkeeping that
    Hugging Face writes, such as the library version, is not the model). A field the saved config lacks
    (added to longlm after the checkpoint was written) counts as its default, as loading that config would."""
    defaults = defaults or {}
    keys = sorted((set(saved) | set(current)) - CONFIG_BOOKKEEPING)
    before = {k: saved.get(k, defaults.get(k)) for k in keys}
    return [f"{k}={before[k]!r} (now {current.get(k)!r})" for k in keys if before[k] != current.get(k)]


def _gather_objects(local: Any) -> list[Any]:
    """`local` of every rank, in rank order (just `[local]` outside distributed training)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered
