"""The main command: `python -m longlm.quickstart` (no arguments, no download).

Trains a tiny Transformer-XL on the public-domain book bundled with longlm, reports validation bits per
character, writes the Hugging Face folder, reloads it with `AutoModelForCausalLM`, saves a loss-curve
picture beside it and prints a sample.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent / "quickstart.yaml"
DEFAULT_ROOT = Path("runs/quickstart")
LOSS_CURVE = "loss.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument(
        "--root-dir", type=Path, default=None,
        help=f"the run's folder (default: {DEFAULT_ROOT}, or {DEFAULT_ROOT}-2, -3, ... when that one holds a run)",
    )
    parser.add_argument("--prompt", default="Anne Elliot ")
    parser.add_argument("--new-tokens", type=int, default=300)
    return parser.parse_args(argv)


def holds_a_run(folder: Path) -> bool:
    """A folder with anything in it is taken: the CLI refuses a second `fit` into a run's checkpoints."""
    return folder.is_dir() and any(folder.iterdir())


def fresh_root(default: Path = DEFAULT_ROOT) -> Path:
    """The first of `default`, `default-2`, `default-3`, ... that holds no run, so running the quickstart
    again needs no flag and never touches the earlier run."""
    candidate, number = default, 1
    while holds_a_run(candidate):
        number += 1
        candidate = default.with_name(f"{default.name}-{number}")
    return candidate


def choose_root(requested: Path | None) -> Path:
    """An explicit `--root-dir` is used as given (the CLI refuses it if it holds a run); else a fresh default."""
    if requested is not None:
        return requested
    root = fresh_root()
    if root != DEFAULT_ROOT:
        print(f"{DEFAULT_ROOT} holds an earlier quickstart run; this run writes to {root}.")
    return root


@contextlib.contextmanager
def argv_of_program_only() -> Iterator[None]:
    """LightningCLI warns when it gets `args` while sys.argv has flags; ours are already parsed, so hide them."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def read_losses(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """`(step, loss)` pairs of `train_loss` and `val_loss` from a CSVLogger's metrics.csv (empty cells skipped)."""
    curves: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for name, points in curves.items():
                if row.get(name):
                    points.append((int(row["step"]), float(row[name])))
    return curves


def save_loss_curve(metrics_csv: Path, png: Path) -> Path | None:
    """Draw the training and validation loss (in bits per byte) to `png`; without matplotlib, say how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: the picture goes to a file
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no loss curve was drawn; install it with `pip install matplotlib`.")
        return None
    curves = read_losses(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("train_loss", "-"), ("val_loss", "o-")):
        if curves[name]:
            steps, losses = zip(*curves[name])
            ax.plot(steps, [loss / math.log(2) for loss in losses], style, label=name.replace("_", " "))
    ax.set_xlabel("training step")
    ax.set_ylabel("bits per character (byte)")
    ax.set_title("longlm quickstart: tiny Transformer-XL on Persuasion")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def csv_metrics_file(trainer) -> Path:
    """The metrics.csv of the run's CSVLogger (quickstart.yaml configures one)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    raise RuntimeError(f"{CONFIG} must configure a lightning.pytorch.loggers.CSVLogger for the loss curve.")


def train(root: Path, max_steps: int | None):
    """Run `fit` with quickstart.yaml under `root`; returns the LightningCLI (trainer and datamodule)."""
    from longlm.training.cli import main as cli_main

    cli_args = ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root)]
    if max_steps is not None:
        cli_args += ["--trainer.max_steps", str(max_steps)]
    with argv_of_program_only():
        return cli_main(cli_args)


def sample(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """A seeded sample, so two runs of the same model print the same text."""
    torch.manual_seed(0)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    generated = model.generate(
        ids, max_new_tokens=new_tokens, do_sample=True, top_k=20, temperature=0.8, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(generated[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlm.evaluation.lm import evaluate_stream, lm_metrics

    cli = train(choose_root(args.root_dir), args.max_steps)
    root = Path(cli.trainer.default_root_dir)
    hf_dir = root / "hf"

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    datamodule = cli.datamodule
    split = datamodule.eval_split("validation")
    result = evaluate_stream(model, split, tgt_len=datamodule.eval_tgt_len, batch_size=datamodule.eval_batch_size)
    metrics = lm_metrics(result, split, "enwik8")
    print(f"validation bits per character: {metrics['bits_per_character']:.3f}")
    print(f"Hugging Face folder: {hf_dir} (reloaded with AutoModelForCausalLM)")

    png = save_loss_curve(csv_metrics_file(cli.trainer), root / LOSS_CURVE)
    if png is not None:
        print(f"loss curve: {png}")
    print(f"TensorBoard logs: tensorboard --logdir {root / 'tensorboard'}")

    text = sample(model, tokenizer, args.prompt, args.new_tokens)
    print("----- sample -----")
    print(text)
    print("------------------")
    summary = {
        "validation_bits_per_character": metrics["bits_per_character"],
        "hf_dir": str(hf_dir),
        "loss_curve": str(png) if png is not None else None,
        "sample": text,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "sample"}))
    return summary


if __name__ == "__main__":
    main()
