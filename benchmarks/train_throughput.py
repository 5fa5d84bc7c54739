"""Training throughput (tokens/s) and peak memory of a longlm preset, segment-recurrent.

One training step = forward on one segment with the memory returned by the previous step (the model
detaches it), ``loss.backward()``, ``AdamW.step()``. Tokens/s counts predicted tokens (batch x segment)
of the timed steps only; warm-up steps are excluded.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before the model is built, so it
includes weights, gradients and optimizer state); on CPU every configuration runs in a fresh
subprocess that reads ``ru_maxrss`` after imports and data set-up and again at the end, and reports
the growth (model + optimizer + activations + allocator slack).

    python benchmarks/train_throughput.py --preset transformer-xl --layers 4 --hidden 256 --heads 4 \
        --inner 1024 --vocab 259 --seq-lens 512 1024 --mem-len 512 --batch 1 --steps 10 --warmup 3

Prints a table and, last, one JSON line (``{"benchmark": "train_throughput", ...}``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER_FLAG = "--_worker"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def system_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine so far (all cores; /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def setup_torch(threads: int | None, device: str):
    import torch

    threads = threads or available_cores()
    torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch, threads, device


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_longlm(args: argparse.Namespace, device: str):
    from longlm.configuration_longlm import LongLMConfig
    from longlm.modeling_longlm import LongLMForCausalLM

    overrides: dict[str, Any] = {}
    for flag, field in (
        ("layers", "num_hidden_layers"),
        ("hidden", "hidden_size"),
        ("heads", "num_attention_heads"),
        ("inner", "intermediate_size"),
        ("vocab", "vocab_size"),
        ("mem_len", "mem_len"),
        ("dropout", "hidden_dropout_prob"),
        ("attn_dropout", "attention_dropout"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    for item in getattr(args, "set", None) or []:  # free-form KEY=VALUE (JSON values)
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    config = LongLMConfig.from_preset(args.preset, **overrides)
    model = LongLMForCausalLM(config).to(device)
    model.train()
    return model, config


DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "enwik8-sample", "enwiki_sample.xml")


def real_byte_tokens(path: str, rows: int, length: int, device: str):
    """(rows, length) ids of real text: consecutive stretches of the enwik8-style file's train split as
    byte tokens (ByT5 ids, vocabulary 259), the same ids longlm trains on. Speed does not depend on the
    ids, but benchmarks feed real data rather than invented tokens."""
    import torch

    from longlm.data.enwik8 import bytes_to_ids, read_bytes, split_bounds

    data = read_bytes(Path(path))
    data = data[: split_bounds(len(data))["train"][1]]
    need = rows * length
    if need > len(data):
        raise ValueError(f"Benchmark data '{path}' has {len(data)} training bytes; {need} are needed.")
    return torch.from_numpy(bytes_to_ids(data[:need]).astype("int64")).view(rows, length).to(device)


def num_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_longlm_worker(args: argparse.Namespace, seg_len: int) -> dict[str, Any]:
    """One configuration, in this process. Returns a result row."""
    torch, threads, device = setup_torch(args.threads, args.device)
    torch.manual_seed(args.seed)
    total_steps = args.warmup + args.steps
    data = real_byte_tokens(args.data, args.batch, total_steps * seg_len + 1, device)
    rss_before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, config = build_longlm(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    memory = None
    step_times: list[float] = []
    for step in range(total_steps):
        start = step * seg_len
        inputs = data[:, start : start + seg_len]
        targets = data[:, start + 1 : start + seg_len + 1]
        sync(torch, device)
        t0 = time.perf_counter()
        out = model(input_ids=inputs, memory=memory, shift_labels=targets)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory = out.memory
        sync(torch, device)
        step_times.append(time.perf_counter() - t0)
    timed = step_times[args.warmup :]
    elapsed = sum(timed)
    tokens = args.batch * seg_len * len(timed)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "cuda_max_allocated"
    else:
        peak = rss_mb() - rss_before
        memory_kind = "cpu_peak_rss_growth"
    return {
        "impl": "longlm",
        "preset": args.preset,
        "seg_len": seg_len,
        "mem_len": config.mem_len,
        "batch": args.batch,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "inner": config.intermediate_size,
        "vocab": config.vocab_size,
        "params": num_params(model),
        "warmup": args.warmup,
        "steps": len(timed),
        "tokens_per_s": tokens / elapsed,
        "step_ms_median": sorted(timed)[len(timed) // 2] * 1e3,
        "peak_mem_mb": peak,
        "memory_kind": memory_kind,
        "peak_rss_mb": rss_mb(),
        "device": device,
        "threads": threads,
        "final_loss": out.loss.item(),
    }


def environment(device: str, threads: int) -> dict[str, Any]:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": threads,
        "nproc": available_cores(),
        "cpu": cpu_model(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_in_subprocess(argv: list[str]) -> dict[str, Any]:
    """Run ``sys.executable <argv>`` and return the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(argv)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec)."""
    cells = [[h for h, _, _ in columns]] + [[format(r[k], f) for _, k, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="transformer-xl")
    parser.add_argument("--layers", type=int, help="num_hidden_layers")
    parser.add_argument("--hidden", type=int, help="hidden_size")
    parser.add_argument("--heads", type=int, help="num_attention_heads")
    parser.add_argument("--inner", type=int, help="intermediate_size")
    parser.add_argument("--vocab", type=int, default=259, help="vocab_size (at least 259: the data are byte tokens)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="raw byte file whose train split feeds the steps")
    parser.add_argument("--mem-len", dest="mem_len", type=int, help="mem_len (default: the preset's)")
    parser.add_argument("--dropout", type=float, help="hidden_dropout_prob (default: the preset's)")
    parser.add_argument("--attn-dropout", dest="attn_dropout", type=float, help="attention_dropout")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other LongLMConfig field (JSON value)")
    parser.add_argument("--seq-lens", dest="seq_lens", type=int, nargs="+", default=[512], help="segment lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--same-process", action="store_true", help="CPU: run all configurations here (peak RSS is then not per configuration)"
    )
    parser.add_argument(WORKER_FLAG, dest="worker_seg_len", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker_seg_len is not None:
        print(json.dumps(run_longlm_worker(args, args.worker_seg_len)), flush=True)
        return
    torch, threads, device = setup_torch(args.threads, args.device)
    isolate = device == "cpu" and not args.same_process
    rows = []
    for seg_len in args.seq_lens:
        if isolate:
            row = run_in_subprocess([os.path.abspath(__file__), *raw, WORKER_FLAG, str(seg_len)])
        else:
            row = run_longlm_worker(args, seg_len)
        rows.append(row)
        print(
            f"# seg {seg_len}: {row['tokens_per_s']:.0f} tok/s, peak {row['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True
        )
    env = environment(device, threads)
    print(
        f"longlm preset={args.preset} params={rows[0]['params']:,} mem_len={rows[0]['mem_len']} batch={args.batch} "
        f"device={device} threads={threads} torch={env['torch']} cpu={env['cpu']}"
    )
    memory_header = "peak MB (CUDA alloc)" if device.startswith("cuda") else "peak RSS growth MB"
    print(
        format_table(
            rows,
            [
                ("segment", "seg_len", "d"),
                ("mem", "mem_len", "d"),
                ("tokens/s", "tokens_per_s", ".0f"),
                ("median step ms", "step_ms_median", ".1f"),
                (memory_header, "peak_mem_mb", ".0f"),
                ("timed steps", "steps", "d"),
            ],
        )
    )
    print(json.dumps({"benchmark": "train_throughput", "env": env, "results": rows}))


if __name__ == "__main__":
    main()
