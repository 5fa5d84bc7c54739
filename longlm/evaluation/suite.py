"""One preset through the long-context suite: train on the retrieval recipe, then measure what it bought.

`run_preset` trains `CausalLMPretraining(preset)` at the suite's size (`shrunk_preset`), then scores
retrieval by distance on the haystack's held-apart (test) split, held-apart bits per byte on each LM
evaluation source (word-level perplexity too for PG-19 folders), and, for memories sized by `mem_len`, the
loss by evaluation memory and by position in the document. The trained model is saved as an HF folder
beside `result.json`, so any number can be recomputed from the folder alone.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from longlm.data.planted import Haystack
from longlm.evaluation.lm import evaluate_stream
from longlm.evaluation.recipe_fields import parsed_dataclass
from longlm.evaluation.long_range import RetrievalRecipe, reach_in_segments, retrieval_accuracy, train_retrieval
from longlm.evaluation.loss_by_context import MEM_LENS, loss_by_context, split_prefix
from longlm.presets import PRESETS, shrunk_preset

RESULT_FILE = "result.json"


@dataclass
class SuiteConfig:
    """The suite's data, model size and recipe (`configs/long_range/tiny.yaml`).

    haystack: text files and/or PG-19 folders; training reads their train splits, scoring their test splits.
    lm_eval: name -> text file or PG-19 folder whose test split gives held-apart bits per byte.
    lm_eval_tokens: tokens of each held-apart split scored (its first ones).
    context_mem_lens / context_tokens: the loss-by-context evaluation (memories sized by mem_len only).
    size: config fields every preset gets (layers, width, heads, dropout).
    mechanism: config fields a preset gets only where it sets that field itself (memory lengths, windows, blocks).
    recipe: the retrieval task and its training (`RetrievalRecipe`).
    """

    haystack: list[str] = field(default_factory=lambda: ["../shared/data/pg19-sample"])
    lm_eval: dict[str, str] = field(default_factory=dict)
    lm_eval_tokens: int = 32768
    context_mem_lens: list[int] = field(default_factory=lambda: list(MEM_LENS))
    context_tokens: int = 32768
    size: dict[str, Any] = field(default_factory=dict)
    mechanism: dict[str, Any] = field(default_factory=dict)
    recipe: RetrievalRecipe = field(default_factory=RetrievalRecipe)


def suite_parser(description: str | None = None):
    """The jsonargparse parser of `scripts/long_range.py`: `--config YAML`, `--preset`, `--output`, `--device`
    and every `SuiteConfig` field (`--recipe.max_steps 500`); an unknown key is refused."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--preset", required=True, help="a name from longlm.presets.PRESETS")
    parser.add_argument("--output", required=True, help="folder for result.json and hf/")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_class_arguments(SuiteConfig, None)
    return parser


def parse_suite(args: list[str]) -> tuple[Any, SuiteConfig]:
    """(the parsed namespace, its `SuiteConfig`) from command-line style arguments."""
    return parsed_dataclass(suite_parser(), SuiteConfig, args)


def load_suite(path: str | Path, *overrides: str) -> SuiteConfig:
    """The `SuiteConfig` of a YAML such as `configs/long_range/tiny.yaml`, with `--field value` overrides."""
    return parse_suite(["--config", str(path), "--preset", "full", "--output", ".", *overrides])[1]


def build_module(preset: str, suite: SuiteConfig):
    """The Lightning pretraining module of `preset` at the suite's size, with the byte tokenizer attached."""
    from transformers import ByT5Tokenizer

    from longlm.training.lm_module import CausalLMPretraining

    module = CausalLMPretraining(preset, config=shrunk_preset(preset, suite.size, suite.mechanism), vocab_size=259)
    module.tokenizer = ByT5Tokenizer(extra_ids=0)
    return module


def held_apart_lm(model, path: str, tokens: int, tgt_len: int, device) -> dict[str, float]:
    """Bits per byte (and word-level perplexity) on the first `tokens` bytes of `path`'s test split."""
    split = split_prefix(Haystack(path, "test").as_split(), tokens)
    result = evaluate_stream(model, split, tgt_len=tgt_len, batch_size=1)
    nll = result["nll"]
    return {
        "bits_per_byte": nll / result["tokens_scored"] / math.log(2),
        "word_perplexity": math.exp(nll / max(1, split.num_words * result["tokens_scored"] / max(1, len(split.tokens) - 1))),
        "tokens_scored": result["tokens_scored"],
    }


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_preset(preset: str, suite: SuiteConfig, output: str | Path, device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and measure one preset; writes `output/result.json` and the HF folder `output/hf`."""
    PRESETS.get(preset)  # an unknown name is refused before anything is read
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    recipe = suite.recipe
    train_haystack, test_haystack = Haystack(suite.haystack, "train"), Haystack(suite.haystack, "test")
    torch.manual_seed(recipe.seed)
    module = build_module(preset, suite).to(device)
    model = module.model
    log(f"[{preset}] {sum(p.numel() for p in model.parameters()):,} parameters; training on {', '.join(suite.haystack)}")
    started = time.perf_counter()
    training = train_retrieval(
        module, recipe, train_haystack,
        log=lambda row: log(f"[{preset}] step {row['step']} tokens {row['tokens']:,} {row['seconds']:.0f}s "
                            f"lm {row['lm_bits_per_token']:.3f} bits/token answer {row['answer_loss'] or float('nan'):.3f} "
                            f"stage {row['curriculum_stage']}"),
    )
    model.eval()
    retrieval = retrieval_accuracy(model, test_haystack, recipe, device=device)
    log(f"[{preset}] exact match by distance: " + ", ".join(f"{r['distance_segments']:g}: {r['exact_match']:.2f}" for r in retrieval))
    lm = {name: held_apart_lm(model, path, suite.lm_eval_tokens, recipe.seg_len, device) for name, path in suite.lm_eval.items()}
    context = None
    if model.model.memory.sized_by_mem_len and suite.context_mem_lens:
        split = Haystack(suite.haystack, "test").as_split()
        context = loss_by_context(model, split, tgt_len=recipe.seg_len, mem_lens=suite.context_mem_lens, max_tokens=suite.context_tokens)
    result = {
        "preset": preset,
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": training,
        "retrieval": retrieval,
        "reach_segments": reach_in_segments(retrieval),
        "lm": lm,
        "loss_by_context": context,
        "peak_memory_mib": peak_memory_mib(device),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "wall_seconds": time.perf_counter() - started,
        "recipe": asdict(recipe),
        "haystack": suite.haystack,
    }
    model.save_pretrained(output / "hf")
    module.tokenizer.save_pretrained(output / "hf")
    (output / RESULT_FILE).write_text(json.dumps(result, indent=1, default=float))
    return result


def finished_result(output: str | Path) -> dict[str, Any] | None:
    """The result of a preset run that finished (None if it did not: a run that stopped leaves none)."""
    path = Path(output) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' is not a finished result ({error}); delete it to rerun that preset.") from error


__all__ = ["SuiteConfig", "run_preset", "parse_suite", "load_suite", "suite_parser", "finished_result", "build_module", "held_apart_lm", "RESULT_FILE"]
