"""Rows and tables shared by the side-by-side benchmarks (ours vs a peer, steps interleaved in one run)."""
from __future__ import annotations

import time
from statistics import median
from typing import Any, Callable

from train_throughput import format_table, rss_mb, sync


def measure_peak_memory(torch, device: str, build_step: Callable[[], Callable], data) -> tuple[float, str, list[float]]:
    """(peak MB, what kind of peak, step seconds) of building a model with `build_step()` and running its
    step on each of `data`: CUDA's max allocation, or on CPU the growth of this process's peak RSS."""
    rss_before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = build_step()
    times = []
    for batch in data:
        sync(torch, device)
        t0 = time.perf_counter()
        run(batch)
        sync(torch, device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated", times
    return rss_mb() - rss_before, "cpu_peak_rss_growth", times


def summary_entry(row: dict[str, Any], total_len: int, segments: int, peak_mem_mb: float, **extra: Any) -> dict[str, Any]:
    """One implementation at one length: the speed worker's row plus its separately measured peak memory."""
    return {
        **extra,
        "impl": row["impl"],
        "total_len": total_len,
        "segments": segments,
        "params": row["params"],
        "tokens_per_s": row["tokens_per_s"],
        "tokens_per_s_best": row["tokens_per_s_best"],
        "tokens_per_s_clean": row["tokens_per_s_clean"],
        "clean_steps": row["clean_steps"],
        "peak_mem_mb": peak_mem_mb,
        "timed_steps": row["steps"],
        "final_loss": row["final_loss"],
    }


def ratio_row(ours_entry: dict[str, Any], theirs_entry: dict[str, Any], pair_speed_ratios: list[float], **extra: Any) -> dict[str, Any]:
    """Ours/theirs speed (median step, best step, median of interleaved pairs, clean steps) and memory."""
    ours, theirs = ours_entry, theirs_entry
    return {
        **extra,
        "total_len": ours["total_len"],
        "speed_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "speed_ratio_best": ours["tokens_per_s_best"] / theirs["tokens_per_s_best"],
        "speed_ratio_pairs": median(pair_speed_ratios),
        "speed_ratio_clean": ours["tokens_per_s_clean"] / theirs["tokens_per_s_clean"],
        "ours_mem_mb": ours["peak_mem_mb"],
        "theirs_mem_mb": theirs["peak_mem_mb"],
        "mem_ratio": ours["peak_mem_mb"] / theirs["peak_mem_mb"],
    }


def print_tables(summary: list[dict], ratios: list[dict], device: str, lead: list[tuple[str, str, str]] = ()) -> None:
    """The per-implementation table and the ours/theirs table; `lead` columns go first in both."""
    memory_header = "peak MB (CUDA alloc)" if device.startswith("cuda") else "peak RSS growth MB"
    print(
        format_table(
            summary,
            [
                *lead,
                ("impl", "impl", ""),
                ("total len", "total_len", "d"),
                ("segments", "segments", "d"),
                ("params", "params", ","),
                ("tokens/s (median step)", "tokens_per_s", ".0f"),
                ("tokens/s (best step)", "tokens_per_s_best", ".0f"),
                ("tokens/s (clean steps)", "tokens_per_s_clean", ".0f"),
                ("clean steps", "clean_steps", "d"),
                (memory_header, "peak_mem_mb", ".0f"),
                ("timed steps", "timed_steps", "d"),
            ],
        )
    )
    print()
    print(
        format_table(
            ratios,
            [
                *lead,
                ("total len", "total_len", "d"),
                ("ours/theirs speed (median)", "speed_ratio", ".2f"),
                ("(best)", "speed_ratio_best", ".2f"),
                ("(median of step pairs)", "speed_ratio_pairs", ".2f"),
                ("(clean steps)", "speed_ratio_clean", ".2f"),
                ("ours MB", "ours_mem_mb", ".0f"),
                ("theirs MB", "theirs_mem_mb", ".0f"),
                ("ours/theirs memory", "mem_ratio", ".2f"),
            ],
        )
    )
