"""`LMDataModule`: any registered corpus as ordered segment streams for train/validation/test."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from longlm.data.corpus import CORPORA, SPLITS, CorpusSplit, check_decode_errors
from longlm.data.encoder_tokens import with_encoder_tokens
from longlm.training.sampler import ResumableSegmentSampler, SegmentDataset, SegmentLoader, rank_streams

BUNDLED_TEXT = Path(__file__).resolve().parent.parent / "data" / "bundled" / "persuasion.txt.gz"


class LMDataModule(L.LightningDataModule):
    """Ordered streams for segment-recurrent LM training.

    Args:
        dataset: a registered corpus (`enwik8` for any raw byte file, `pg19` for the PG-19 layout).
        path: the file or folder; None trains on the public-domain book bundled with longlm (bytes).
        batch_size / tgt_len: training streams per rank (device) and segment length; with W ranks the split
            is cut into W * batch_size contiguous streams and each rank owns its own batch_size of them.
        eval_batch_size / eval_tgt_len: the same for validation and test.
        tokenizer_vocab_size: size of the subword tokenizer trained on PG-19's train split.
        cache_dir: where tokenised splits and tokenizers are cached (default ~/.cache/longlm).
        encoder_tokens: give the tokenizer the encoder's `<s>`/`<mask>` (appended to the vocabulary when
            missing, so the corpus's token ids do not change) and RoBERTa's pair template; masked LM needs
            them, and the CLI sets this from `model.task`.
        decode_errors: what a text corpus (PG-19) does with a book that is not UTF-8: "strict" refuses it
            naming the file and byte offset, "replace" decodes it with U+FFFD and says how much in one warning.
    """

    def __init__(
        self,
        dataset: str = "enwik8",
        path: str | None = None,
        batch_size: int = 22,
        tgt_len: int = 512,
        eval_batch_size: int = 10,
        eval_tgt_len: int = 128,
        tokenizer_vocab_size: int = 32000,
        cache_dir: str | None = None,
        encoder_tokens: bool = False,
        decode_errors: str = "strict",
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("tgt_len", tgt_len), ("eval_batch_size", eval_batch_size), ("eval_tgt_len", eval_tgt_len)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}.")
        check_decode_errors(decode_errors, "data.decode_errors")
        self.save_hyperparameters()
        self.corpus = CORPORA.get(dataset)(
            path if path is not None else BUNDLED_TEXT, cache_dir=cache_dir, vocab_size=tokenizer_vocab_size,
            decode_errors=decode_errors,
        )
        self.batch_size, self.tgt_len = batch_size, tgt_len
        self.eval_batch_size, self.eval_tgt_len = eval_batch_size, eval_tgt_len

    @cached_property
    def tokenizer(self):
        """The corpus's tokenizer (with the encoder tokens if asked): the model's vocabulary and the one saved
        with checkpoints and the exported folder."""
        return with_encoder_tokens(self.corpus.tokenizer) if self.hparams.encoder_tokens else self.corpus.tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @cached_property
    def train_split(self) -> CorpusSplit:
        return self.corpus.split("train")

    def eval_split(self, name: str) -> CorpusSplit:
        return self.corpus.split(name)

    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        """(this process's global rank, number of ranks) of the attached trainer; (0, 1) without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        self.corpus.check_splits(splits_for_stage(stage))
        if stage in (None, "fit"):
            rank, world = self.rank_and_world_size
            split = self.train_split
            self.train_streams = rank_streams(split.tokens, split.doc_starts, self.batch_size, self.tgt_len, rank, world)
            # built (and cached) now, so that a damaged validation book stops the run before its first step
            self.eval_split("validation")

    def _eval_loader(self, split: str) -> DataLoader:
        data = self.eval_split(split)
        rank, world = self.rank_and_world_size
        streams = rank_streams(
            data.tokens, data.doc_starts, self.eval_batch_size, self.eval_tgt_len, rank, world, drop_last=False
        )
        sampler = ResumableSegmentSampler(len(streams), rank=rank, world_size=world)
        return DataLoader(SegmentDataset(streams), batch_size=None, sampler=sampler, generator=_private_generator())

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        start = getattr(module, "next_train_segment", 0)
        # BPTT through k segments: each item is k consecutive segments, consumed by one training step
        depth = getattr(module, "segments_per_step", 1)
        dataset = SegmentDataset(self.train_streams, group=depth)
        if len(dataset) == 0:
            raise ValueError(
                f"The training split has {len(self.train_streams)} segments, fewer than one group of "
                f"bptt_depth={depth}; use a smaller batch_size, tgt_len or bptt_depth, or more data."
            )
        rank, world = self.rank_and_world_size
        sampler = ResumableSegmentSampler(len(dataset), start // depth, rank=rank, world_size=world)
        return SegmentLoader(dataset, sampler, position=lambda: getattr(module, "next_train_segment", 0), generator=_private_generator())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def splits_for_stage(stage: str | None) -> tuple[str, ...]:
    """The splits a Trainer stage will read. `fit` needs all three: it validates as it goes, and a run
    meant to end with the test protocol should not learn that test/ is missing only after training."""
    return {"validate": ("validation",), "test": ("test",), "predict": ()}.get(stage or "fit", SPLITS)


def _private_generator() -> torch.Generator:
    """Order is fixed, so the loader needs no randomness; its own generator keeps it from drawing on the
    global RNG when an iterator starts (which would shift dropout after a resume)."""
    return torch.Generator().manual_seed(0)


__all__ = ["LMDataModule", "CORPORA"]
