"""Long-document QA with a needle: fine-tune encoder variants through the real QA path, score by length and
by needle position.

A variant is a preset at the suite's size plus how it reads a document: `longformer` with global attention on
the question, the same with global attention off (window only), `bigbird`, and `full` truncated to its first
512 tokens. Every variant starts from a freshly initialised encoder (no pretraining: the comparison is between
attention patterns, not checkpoints), is fine-tuned with `scripts/finetune_qa.py`'s LightningCLI on the same
generated SQuAD v2 files, exported as an HF folder, and scored with `evaluate_examples` (what
`scripts/evaluate_qa.py` prints) on held-apart documents of each length. Documents are real haystack text with
the needle "The key of NAME is KEY." and `num_distractors` other names' facts planted, so a model must read
the question's name to choose (a window that cannot see the question can only guess among the facts).
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from longlm.data.encoder_tokens import with_encoder_tokens
from longlm.evaluation.recipe_fields import parsed_dataclass, require_positive_ints
from longlm.data.planted import Haystack, needle_qa_examples, to_text
from longlm.data.qa import QAExample, load_qa_examples
from longlm.evaluation.qa_metrics import exact_match, f1, normalize_answer

NEEDLE_RESULT_FILE = "needle_result.json"
FINETUNE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "finetune_qa.py"
QUESTION_ROOM = 64  # tokens kept for `<s> question </s></s>` and the closing `</s>` beside the document


@dataclass
class NeedleVariant:
    """One encoder and the way it reads: `max_length` None means the whole longest document in one window;
    `truncate` keeps only the first window (no striding over the rest)."""

    name: str
    preset: str
    question_global_attention: bool = True
    max_length: int | None = None
    truncate: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"NeedleVariant.name must be a plain folder name, got {self.name!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= QUESTION_ROOM):
            raise ValueError(f"NeedleVariant.max_length must be None or an integer above {QUESTION_ROOM}, got {self.max_length!r}.")


def default_variants() -> list[NeedleVariant]:
    return [
        NeedleVariant("longformer", "longformer"),
        NeedleVariant("longformer-window-only", "longformer", question_global_attention=False),
        NeedleVariant("bigbird", "bigbird"),
        NeedleVariant("full-512", "full", max_length=512, truncate=True),
    ]


@dataclass
class NeedleRecipe:
    """The task and its fine-tuning, the same for every variant.

    lengths: document lengths scored, in tokens of the suite's tokenizer; train_lengths: those trained on, in
        the shares `train_mix` (one weight per train length; short documents are cheap, so most steps use them).
    positions: relative needle positions (cycled over examples); scores are reported per position too.
    num_distractors / no_answer_fraction / key_digits: the needle task (see `needle_qa_examples`).
    train_examples: generated training questions (spread over train_lengths); eval_examples: per length.
    tokenizer_vocab_size: byte-level BPE trained on the haystack's train split (QA needs a fast tokenizer).
    batch_size, learning_rate, warmup_steps, max_steps, max_minutes: fine-tuning (AdamW, warmup + cosine);
    training stops at `max_steps` or after `max_minutes`, whichever comes first.
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    train_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    train_mix: list[float] | None = None
    positions: list[float] = field(default_factory=lambda: [0.05, 0.25, 0.5, 0.75, 0.95])
    num_distractors: int = 3
    no_answer_fraction: float = 0.3
    key_digits: int = 5
    train_examples: int = 1200
    eval_examples: int = 40
    tokenizer_vocab_size: int = 4096
    batch_size: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    max_steps: int = 1200
    max_minutes: float = 15.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, ("train_examples", "eval_examples", "tokenizer_vocab_size", "batch_size", "max_steps", "key_digits"))
        for name in ("lengths", "train_lengths"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 128 for v in values):
                raise ValueError(f"NeedleRecipe.{name} must list document lengths of at least 128 tokens, got {values!r}.")
        if self.train_mix is not None and (len(self.train_mix) != len(self.train_lengths) or any(w < 0 for w in self.train_mix)
                                           or sum(self.train_mix) <= 0):
            raise ValueError(f"NeedleRecipe.train_mix must give one non-negative weight per train length, got {self.train_mix!r}.")
        if not self.positions or any(not 0.0 <= p <= 1.0 for p in self.positions):
            raise ValueError(f"NeedleRecipe.positions must list relative positions in [0, 1], got {self.positions!r}.")
        if not 0.0 <= self.no_answer_fraction < 1.0:
            raise ValueError(f"NeedleRecipe.no_answer_fraction must be in [0, 1), got {self.no_answer_fraction!r}.")
        if self.max_minutes <= 0 or self.learning_rate <= 0:
            raise ValueError("NeedleRecipe.max_minutes and learning_rate must be positive.")


def haystack_tokenizer(haystack: Haystack, vocab_size: int, folder: Path):
    """A byte-level BPE of the haystack's text with the encoder tokens (`<s>`, `</s>`, `<mask>`, pair template),
    trained once and cached in `folder`."""
    from longlm.data.subword import train_bpe

    texts = [text.decode("utf-8", errors="replace") for text in haystack.texts]
    return with_encoder_tokens(train_bpe(texts, vocab_size, folder))


def bytes_per_token(haystack: Haystack, tokenizer, sample_bytes: int = 1 << 16, seed: int = 0) -> float:
    """How many bytes of haystack text one token holds, measured on a sample (a first guess for sizing)."""
    rng = np.random.default_rng(seed)
    text = to_text(haystack.sample(rng, sample_bytes))
    return len(text.encode("utf-8")) / max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def sized_needle_examples(haystack: Haystack, tokenizer, length: int, ratio: float, *, num_examples: int, seed: int,
                          **task: Any) -> tuple[dict, float]:
    """`needle_qa_examples` whose contexts average `length` tokens: drawn at `ratio` bytes per token, then
    redrawn once at the ratio those contexts actually had (planted facts and unseen books tokenize less
    densely than the sample). Returns (SQuAD v2 dict, the ratio used)."""
    data: dict = {}
    for _ in range(2):
        data = needle_qa_examples(haystack, num_examples=num_examples, context_bytes=round(length * ratio), seed=seed, **task)
        contexts = [p["context"] for p in data["data"][0]["paragraphs"]]
        tokens = sum(len(ids) for ids in tokenizer(contexts, add_special_tokens=False)["input_ids"])
        measured = sum(len(c.encode("utf-8")) for c in contexts) / max(1, tokens)
        if abs(measured - ratio) / ratio < 0.02:
            break
        ratio = measured
    return data, ratio


def write_needle_files(recipe: NeedleRecipe, train: Haystack, test: Haystack, tokenizer, folder: Path) -> dict[str, Any]:
    """`train.json` (questions spread over `train_lengths`) and `test-<length>.json` per scored length, all
    SQuAD v2, contexts sized in tokens (`sized_needle_examples`); returns their paths and the sampled bytes
    per token. Test documents come from the haystack's
    test split, so no scored text was trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    ratio = bytes_per_token(train, tokenizer, seed=recipe.seed)
    common = dict(no_answer_fraction=recipe.no_answer_fraction, key_digits=recipe.key_digits,
                  num_distractors=recipe.num_distractors, positions=recipe.positions)
    paragraphs = []
    weights = np.asarray(recipe.train_mix or [1.0] * len(recipe.train_lengths), dtype=np.float64)
    for index, length in enumerate(recipe.train_lengths):
        share = math.ceil(recipe.train_examples * weights[index] / weights.sum())
        if share == 0:
            continue
        part, _ = sized_needle_examples(train, tokenizer, length, ratio, num_examples=share,
                                        seed=recipe.seed * 1000 + index, **{**common, "positions": None})
        paragraphs += part["data"][0]["paragraphs"]
    order = np.random.default_rng(recipe.seed).permutation(len(paragraphs))[: recipe.train_examples]
    files = {"train": folder / "train.json", "bytes_per_token": ratio, "test": {}}
    files["train"].write_text(json.dumps({"version": "v2.0", "data": [{"title": "needle", "paragraphs": [paragraphs[i] for i in order]}]}))
    for index, length in enumerate(recipe.lengths):
        data, _ = sized_needle_examples(test, tokenizer, length, ratio, num_examples=recipe.eval_examples,
                                        seed=recipe.seed * 1000 + 500 + index, **common)
        path = folder / f"test-{length}.json"
        path.write_text(json.dumps(data))
        files["test"][length] = path
    return files


def needle_positions(path: Path) -> dict[str, float | None]:
    """question id -> the needle's relative position (None when unanswerable), as the generator recorded it."""
    data = json.loads(Path(path).read_text())
    return {qa["id"]: qa.get("needle_position") for doc in data["data"] for p in doc["paragraphs"] for qa in p["qas"]}


def scores_by_position(
    examples: Sequence[QAExample], predictions: dict[str, str], positions: dict[str, float | None], buckets: Sequence[float]
) -> list[dict[str, Any]]:
    """EM/F1 (percent) of the answerable questions grouped by the nearest of `buckets` to their needle."""
    groups: dict[float, list[tuple[float, float]]] = {b: [] for b in buckets}
    for example in examples:
        where = positions.get(example.id)
        if where is None or not example.answers:
            continue
        bucket = min(buckets, key=lambda b: abs(b - where))
        golds = [a["text"] for a in example.answers if normalize_answer(a["text"])] or [""]
        prediction = predictions.get(example.id, "")
        groups[bucket].append((max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)))
    return [
        {"position": b, "examples": len(rows), "exact": 100.0 * sum(r[0] for r in rows) / len(rows),
         "f1": 100.0 * sum(r[1] for r in rows) / len(rows)}
        for b, rows in groups.items() if rows
    ]


def reach_of(variant: NeedleVariant, lengths: Sequence[int]) -> int:
    """Tokens per window the variant reads: its `max_length`, or room for the longest document (documents are
    sized in bytes from the measured bytes per token, so a few run longer) plus the question."""
    return variant.max_length or int(max(lengths) * 1.25) + QUESTION_ROOM


def stride_for(max_length: int) -> int:
    """Tokens shared by consecutive windows of a document longer than one window (training and scoring)."""
    return min(128, max_length // 4)


def finetune_args(variant: NeedleVariant, recipe: NeedleRecipe, init: Path, train_file: Path, root: Path) -> list[str]:
    """`scripts/finetune_qa.py fit` arguments that fine-tune `init` on the needle training file."""
    max_length = reach_of(variant, recipe.train_lengths)
    minutes = recipe.max_minutes
    return [
        "fit",
        f"--seed_everything={recipe.seed}",
        f"--model.pretrained={init}",
        f"--model.config={json.dumps({'question_global_attention': variant.question_global_attention})}",
        f"--model.learning_rate={recipe.learning_rate}",
        f"--model.warmup_steps={recipe.warmup_steps}",
        "--model.min_lr_ratio=0.1",
        f"--data.train_file={train_file}",
        f"--data.max_length={max_length}",
        f"--data.stride={stride_for(max_length)}",
        f"--data.truncate={variant.truncate}",
        f"--data.batch_size={recipe.batch_size}",
        f"--data.seed={recipe.seed}",
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu" if not torch.cuda.is_available() else "--trainer.accelerator=auto",
        "--trainer.devices=1",
        "--trainer.max_epochs=-1",
        f"--trainer.max_steps={recipe.max_steps}",
        f"--trainer.max_time=00:{int(minutes // 60):02d}:{int(minutes % 60):02d}:{int(round((minutes % 1) * 60)):02d}",
        "--trainer.gradient_clip_val=1.0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=logs",
        "--trainer.callbacks+=longlm.training.ExportHuggingFace",
    ]


def trained_steps(logs: Path) -> int:
    """Optimizer steps of a fine-tuning run, from its CSVLogger metrics (the last logged step + 1)."""
    steps = [int(row["step"]) for path in sorted(Path(logs).glob("version_*/metrics.csv"))
             for row in csv.DictReader(path.open()) if row.get("step") not in (None, "")]
    if not steps:
        raise RuntimeError(f"No training step was logged under '{logs}'; expected CSVLogger metrics from finetune_qa.py.")
    return max(steps) + 1


def initial_folder(variant: NeedleVariant, size: dict[str, Any], mechanism: dict[str, Any], tokenizer, folder: Path, seed: int) -> Path:
    """A freshly initialised encoder of `variant.preset` at the suite's size, saved with the tokenizer."""
    from longlm.configuration_longlm import LongLMConfig
    from longlm.modeling_longlm import LongLMForMaskedLM
    from longlm.presets import PRESETS, shrunk_preset

    fields = shrunk_preset(variant.preset, size, mechanism, is_decoder=False)
    fields.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    model = LongLMForMaskedLM(LongLMConfig(**{**PRESETS.get(variant.preset), **fields}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_variant(
    variant: NeedleVariant, recipe: NeedleRecipe, files: dict[str, Any], tokenizer, size: dict[str, Any],
    mechanism: dict[str, Any], folder: Path, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune one variant through `scripts/finetune_qa.py`'s CLI, then score its exported folder per length
    and per needle position; writes and returns `needle_result.json`."""
    from longlm.evaluation.qa import evaluate_examples, load_qa_model

    folder.mkdir(parents=True, exist_ok=True)
    init = initial_folder(variant, size, mechanism, tokenizer, folder / "init", recipe.seed)
    args = finetune_args(variant, recipe, init, files["train"], folder / "finetune")
    (folder / "finetune_args.json").write_text(json.dumps(args, indent=1))
    log(f"[{variant.name}] python scripts/finetune_qa.py " + " ".join(args))
    start = time.perf_counter()
    command = [sys.executable, str(FINETUNE_SCRIPT), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        output = child.stdout.read()
    (folder / "finetune.log").write_text(output)
    if child.returncode != 0:
        raise RuntimeError(f"Fine-tuning variant '{variant.name}' failed (exit {child.returncode}); see {folder / 'finetune.log'}.")
    train_seconds = time.perf_counter() - start
    steps = trained_steps(folder / "finetune" / "logs")
    hf = folder / "finetune" / "hf"
    model, qa_tokenizer = load_qa_model(hf)
    scored = []
    for length, path in files["test"].items():
        examples = load_qa_examples(path)
        window = reach_of(variant, recipe.lengths)
        result = evaluate_examples(model, qa_tokenizer, examples, max_length=window, stride=stride_for(window),
                                   truncate=variant.truncate, batch_size=1)
        mean_tokens = float(np.mean([len(qa_tokenizer(e.context, add_special_tokens=False)["input_ids"]) for e in examples]))
        row = {"length": int(length), "mean_context_tokens": mean_tokens, **result["metrics"], "features": result["features"],
               "by_position": scores_by_position(examples, result["predictions"], needle_positions(path), recipe.positions)}
        log(f"[{variant.name}] {length} tokens: EM {row['exact']:.1f} F1 {row['f1']:.1f}")
        scored.append(row)
    result = {"variant": asdict(variant), "recipe": asdict(recipe), "train_steps": steps, "train_seconds": train_seconds,
              "stopped_by": "max_steps" if steps >= recipe.max_steps else "max_minutes",
              "parameters": sum(p.numel() for p in model.parameters()), "window_tokens": reach_of(variant, recipe.lengths),
              "bytes_per_token": files["bytes_per_token"], "scores": scored, "folder": str(hf)}
    (folder / NEEDLE_RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


@dataclass
class NeedleSuite:
    """The needle-QA suite (`configs/needle_qa/tiny.yaml`).

    haystack: text files and/or PG-19 folders (train split for training documents and the tokenizer, test
    split for scored documents); size: config fields every variant gets; mechanism: fields a variant's preset
    gets only where it sets them (windows, blocks); recipe: `NeedleRecipe`; variants: `NeedleVariant`s.
    """

    haystack: list[str] = field(default_factory=lambda: ["../shared/data/pg19-sample"])
    size: dict[str, Any] = field(default_factory=dict)
    mechanism: dict[str, Any] = field(default_factory=dict)
    recipe: NeedleRecipe = field(default_factory=NeedleRecipe)
    variants: list[NeedleVariant] = field(default_factory=default_variants)

    def variant(self, name: str) -> NeedleVariant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise ValueError(f"Needle variant '{name}' is not in the suite; expected one of {[v.name for v in self.variants]}.")


def needle_parser(description: str | None = None):
    """`scripts/needle_qa.py`'s parser: `--config YAML`, `--variant`, `--runs` and every `NeedleSuite` field."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--variant", default=None, help="one variant's name (default: every variant in turn)")
    parser.add_argument("--runs", default="runs/needle_qa", help="shared data + one folder per variant")
    parser.add_class_arguments(NeedleSuite, None)
    return parser


def parse_needle(args: list[str]) -> tuple[Any, NeedleSuite]:
    config, suite = parsed_dataclass(needle_parser(), NeedleSuite, args)
    suite.variants = [v if isinstance(v, NeedleVariant) else NeedleVariant(**v) for v in suite.variants]
    return config, suite


def finished_needle(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / NEEDLE_RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_needle(suite: NeedleSuite, runs: Path, names: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The named variants (all by default) on one shared tokenizer and data, skipping finished ones."""
    runs = Path(runs)
    names = list(names) if names else [v.name for v in suite.variants]
    variants = [suite.variant(name) for name in names]
    pending = [v for v in variants if finished_needle(runs / v.name) is None]
    if pending:
        train, test = Haystack(suite.haystack, "train"), Haystack(suite.haystack, "test")
        tokenizer = haystack_tokenizer(train, suite.recipe.tokenizer_vocab_size, runs / "tokenizer")
        files = write_needle_files(suite.recipe, train, test, tokenizer, runs / "data")
        for variant in pending:
            run_variant(variant, suite.recipe, files, tokenizer, suite.size, suite.mechanism, runs / variant.name, log)
    return [finished_needle(runs / v.name) for v in variants]


__all__ = ["NeedleSuite", "needle_parser", "parse_needle", "run_needle", "finished_needle", "NeedleVariant", "NeedleRecipe", "default_variants", "haystack_tokenizer", "bytes_per_token",
           "write_needle_files", "sized_needle_examples", "needle_positions", "scores_by_position", "finetune_args", "initial_folder",
           "run_variant", "NEEDLE_RESULT_FILE"]
