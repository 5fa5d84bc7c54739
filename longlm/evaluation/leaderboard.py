"""The leaderboard: every decoder preset through the suite with the same data, tokens and seed, then one
table, one JSONL and the pictures.

Each preset runs in its own process (`scripts/long_range.py`), so its peak memory is its own and a crash
stops only that preset; a preset whose `result.json` exists is not retrained (the run is resumable).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from longlm.evaluation.suite import finished_result

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "long_range.py"
NEEDLE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "needle_qa.py"
PLOTS = ("leaderboard-retrieval.png", "leaderboard-digits.png", "leaderboard-training.png", "leaderboard-context.png")
NEEDLE_PLOT = "leaderboard-needle.png"


def preset_command(preset: str, config: str, output: Path, device: str, budget_minutes: float, extra: Sequence[str]) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", config, "--preset", preset, "--output", str(output),
            "--device", device, "--recipe.max_minutes", str(budget_minutes), *extra]


def run_all(presets: Sequence[str], config: str, runs: Path, device: str, budget_minutes: float, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Each preset's result, training only those without one; progress bar over presets, the child's lines as they come."""
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(presets, desc="leaderboard", unit="preset")
    for preset in bar:
        bar.set_postfix_str(preset)
        output = runs / preset
        result = finished_result(output)
        if result is None:
            command = preset_command(preset, config, output, device, budget_minutes, extra)
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
                for line in child.stdout:
                    if line.startswith("["):
                        bar.write(line.rstrip())
            if child.returncode != 0:
                raise RuntimeError(f"Preset '{preset}' failed (exit {child.returncode}); rerun `{' '.join(command)}` to see why.")
            result = finished_result(output)
        else:
            bar.write(f"[{preset}] finished before: {output / 'result.json'} (delete it to retrain)")
        results.append(result)
    return results


def _cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(results: Sequence[dict[str, Any]], header: str) -> str:
    distances = [r["distance_segments"] for r in results[0]["retrieval"]]
    lines = [header, "", "## Retrieval: exact match by distance (segments of %d tokens)" % results[0]["recipe"]["seg_len"], ""]
    lines.append("| preset | " + " | ".join(f"{d:g}" for d in distances) + " | reach (≥0.9) | digit acc. @1 seg |")
    lines.append("|---|" + "---|" * (len(distances) + 2))
    for r in results:
        cells = {row["distance_segments"]: row for row in r["retrieval"]}
        one = cells.get(1) or cells.get(1.0)
        lines.append(f"| {r['preset']} | " + " | ".join(_cell(cells[d]["exact_match"]) for d in distances)
                     + f" | {r['reach_segments']:g} | {_cell(one['digit_accuracy'] if one else None)} |")
    chance = results[0]["retrieval"][0]
    lines.append(f"| chance | " + " | ".join(f"{chance['chance_exact_match']:.0e}" for _ in distances) + f" | — | {chance['chance_digit_accuracy']:.2f} |")
    # partial recall that exact match hides: the share of the key's digits right, by distance
    lines += ["", "Digit accuracy by distance (share of the key's digits right; chance "
              f"{chance['chance_digit_accuracy']:.2f}):", ""]
    lines.append("| preset | " + " | ".join(f"{d:g}" for d in distances) + " |")
    lines.append("|---|" + "---|" * len(distances))
    for r in results:
        cells = {row["distance_segments"]: row for row in r["retrieval"]}
        lines.append(f"| {r['preset']} | " + " | ".join(_cell(cells[d]["digit_accuracy"]) for d in distances) + " |")
    names = sorted({name for r in results for name in r["lm"]})
    lines += ["", "## Language modelling and cost", ""]
    lines.append("| preset | params | train tokens | minutes | stopped by | train tok/s | peak MiB | "
                 + " | ".join(f"{n} bits/byte" for n in names) + (" | pg19 word ppl |" if "pg19" in names else " |"))
    lines.append("|---|" + "---|" * (6 + len(names) + ("pg19" in names)))
    for r in results:
        t = r["training"]
        lm = " | ".join(_cell(r["lm"][n]["bits_per_byte"], 3) if n in r["lm"] else "—" for n in names)
        ppl = f" | {r['lm']['pg19']['word_perplexity']:.3g}" if "pg19" in r["lm"] else ""
        lines.append(f"| {r['preset']} | {r['parameters']:,} | {t['tokens']:,} | {t['seconds'] / 60:.1f} | {t['stopped_by']} | "
                     f"{t['tokens_per_s']:.0f} | {r['peak_memory_mib']:.0f} | {lm}{ppl} |")
    context = [r for r in results if r.get("loss_by_context")]
    if context:
        mem_lens = [row["mem_len"] for row in context[0]["loss_by_context"]["by_mem_len"]]
        lines += ["", "## Loss by evaluation memory (bits per byte, held-apart haystack)", ""]
        lines.append("| preset | " + " | ".join(f"mem {m}" for m in mem_lens) + " |")
        lines.append("|---|" + "---|" * len(mem_lens))
        for r in context:
            rows = {row["mem_len"]: row["bits_per_token"] for row in r["loss_by_context"]["by_mem_len"]}
            lines.append(f"| {r['preset']} | " + " | ".join(_cell(rows.get(m), 3) for m in mem_lens) + " |")
    lines += ["", *(f"![{name}]({name})" for name in PLOTS), ""]
    return "\n".join(lines)


def _save_figure(path: Path, draw) -> Path:
    """One 7x4.2 in figure drawn by `draw(ax)`, saved as a PNG (the look every leaderboard picture shares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(results: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """Accuracy vs distance, LM bits vs training tokens, loss vs evaluation memory (one line per preset)."""

    def retrieval(ax) -> None:
        for r in results:
            rows = r["retrieval"]
            ax.plot([row["distance_segments"] for row in rows], [row["exact_match"] for row in rows], marker="o", label=r["preset"])
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="distance from fact to query (segments)", ylabel="exact match", ylim=(-0.03, 1.03),
               title="Retrieval across segments (planted key in real text)")
        ax.legend(fontsize=7, ncol=2)

    def digits(ax) -> None:
        for r in results:
            rows = r["retrieval"]
            ax.plot([row["distance_segments"] for row in rows], [row["digit_accuracy"] for row in rows], marker="o", label=r["preset"])
        ax.axhline(results[0]["retrieval"][0]["chance_digit_accuracy"], color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="distance from fact to query (segments)", ylabel="digit accuracy (chance dotted)",
               ylim=(-0.03, 1.03), title="Partial recall: share of the key's digits right")
        ax.legend(fontsize=7, ncol=2)

    def training(ax) -> None:
        for r in results:
            history = r["training"]["history"]
            ax.plot([h["tokens"] for h in history], [h["lm_bits_per_token"] for h in history], label=r["preset"])
        ax.set(xlabel="training tokens", ylabel="train LM bits per byte", title="Training curves (same data, tokens, seed)")
        ax.legend(fontsize=7, ncol=2)

    def context(ax) -> None:
        for r in results:
            if r.get("loss_by_context"):
                rows = r["loss_by_context"]["by_mem_len"]
                ax.plot([max(row["mem_len"], 1) for row in rows], [row["bits_per_token"] for row in rows], marker="o", label=r["preset"])
        ax.set(xscale="log", xlabel="evaluation memory (tokens; 1 = none)", ylabel="held-apart bits per byte",
               title="Loss by evaluation memory")
        ax.legend(fontsize=7)

    return [_save_figure(folder / name, draw) for name, draw in zip(PLOTS, (retrieval, digits, training, context))]


def needle_markdown(results: Sequence[dict[str, Any]]) -> str:
    """The encoder table: EM/F1 by document length, then F1 of answerable questions by needle position."""
    lengths = [s["length"] for s in results[0]["scores"]]
    recipe = results[0]["recipe"]
    lines = ["## Needle QA (encoders): EM / F1 by document length", "",
             f"SQuAD v2 on held-apart PG-19 text; the needle and {recipe['num_distractors']} other names' facts planted, "
             f"{recipe['no_answer_fraction']:.0%} of questions unanswerable; {recipe['eval_examples']} questions per length; "
             "fine-tuned from a fresh initialisation through `scripts/finetune_qa.py`.", ""]
    lines.append("| variant | window (tokens) | " + " | ".join(f"{n} tok EM / F1" for n in lengths)
                 + " | steps | minutes | stopped by |")
    lines.append("|---|---|" + "---|" * (len(lengths) + 3))
    for r in results:
        cells = " | ".join(f"{s['exact']:.1f} / {s['f1']:.1f}" for s in r["scores"])
        reads = f"{r['window_tokens']:,}" + (" (truncated)" if r["variant"]["truncate"] else "")
        lines.append(f"| {r['variant']['name']} | {reads} | {cells} | {r['train_steps']} | {r['train_seconds'] / 60:.1f} | {r['stopped_by']} |")
    positions = [row["position"] for row in results[0]["scores"][-1]["by_position"]]
    lines += ["", f"F1 of answerable questions by needle position (relative; {lengths[-1]}-token documents):", ""]
    lines.append("| variant | " + " | ".join(f"{p:g}" for p in positions) + " |")
    lines.append("|---|" + "---|" * len(positions))
    for r in results:
        rows = {row["position"]: row["f1"] for row in r["scores"][-1]["by_position"]}
        lines.append(f"| {r['variant']['name']} | " + " | ".join(_cell(rows.get(p), 1) for p in positions) + " |")
    lines += ["", f"![{NEEDLE_PLOT}]({NEEDLE_PLOT})", ""]
    return "\n".join(lines)


def plot_needle(results: Sequence[dict[str, Any]], folder: Path) -> Path:
    def draw(ax) -> None:
        for r in results:
            ax.plot([s["length"] for s in r["scores"]], [s["f1"] for s in r["scores"]], marker="o", label=r["variant"]["name"])
        ax.axhline(90, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="document length (tokens)", ylabel="F1", ylim=(-3, 103),
               title="Needle QA: F1 by document length")
        ax.legend(fontsize=7)

    return _save_figure(folder / NEEDLE_PLOT, draw)


def write_results(results: Sequence[dict[str, Any]], folder: Path, header: str, needle: Sequence[dict[str, Any]] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [*results, *({"needle_qa": r} for r in needle)]
    (folder / "leaderboard.jsonl").write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
    plot(results, folder)
    text = markdown(results, header)
    if needle:
        plot_needle(needle, folder)
        text += "\n" + needle_markdown(needle)
    (folder / "leaderboard.md").write_text(text)


def run_needle_variants(names: Sequence[str], config: str, runs: Path, budget_minutes: float, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Each needle variant in its own `scripts/needle_qa.py` process (finished ones are skipped there)."""
    from tqdm.auto import tqdm

    from longlm.evaluation.needle_qa import finished_needle

    results = []
    bar = tqdm(names, desc="needle QA", unit="variant")
    for name in bar:
        bar.set_postfix_str(name)
        if finished_needle(runs / name) is None:
            command = [sys.executable, str(NEEDLE_SCRIPT), "--config", config, "--variant", name, "--runs", str(runs),
                       "--recipe.max_minutes", str(budget_minutes), *extra]
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
                for line in child.stdout:
                    if line.startswith("[") and "finetune_qa.py fit" not in line:
                        bar.write(line.rstrip())
            if child.returncode != 0:
                raise RuntimeError(f"Needle variant '{name}' failed (exit {child.returncode}); rerun `{' '.join(command)}` to see why.")
        else:
            bar.write(f"[{name}] finished before: {runs / name / 'needle_result.json'} (delete it to retrain)")
        results.append(finished_needle(runs / name))
    return results


__all__ = ["run_all", "markdown", "plot", "write_results", "preset_command", "needle_markdown", "plot_needle",
           "run_needle_variants"]
