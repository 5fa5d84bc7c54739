"""One short device run (issue 15, GPU part): parity of the GPU kernels with the CPU reference paths, bf16
training tokens/s and peak GPU memory of every preset at 8k and 32k, and model FLOPs utilisation of `full`
and `longformer` at 8k. Prepared and checked on CPU at toy size (`--smoke`); meant for `benchmarks/gpu/run.sh`.

    python benchmarks/gpu/device_check.py --out $OUT [--sections parity throughput mfu] [--lengths 8192 32768]
    python benchmarks/gpu/device_check.py --smoke --out /tmp/gpu-smoke      # CPU, toy sizes: the script runs

Writes OUT/device-check.jsonl (one JSON object per measurement) and OUT/device-check.md (the tables), and
prints each row as it is measured, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from longlm import LongLMConfig, LongLMForCausalLM  # noqa: E402
from longlm.presets import PRESETS, shrunk_preset  # noqa: E402
from tests.presets_tiny import tiny_preset_config  # noqa: E402
from train_throughput import num_params, real_byte_tokens  # noqa: E402

# the issue's side-by-side size; every preset's own mechanism at a size that fits a long segment
SIZE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024, vocab_size=259,
            hidden_dropout_prob=0.0, attention_dropout=0.0)
MECHANISM = dict(mem_len=2048, cmem_len=512, compression_rate=4, knn_memory_size=65536, knn_top_k=32,
                 num_memory_tokens=16, attention_window=512, block_size=64, num_random_blocks=3, num_buckets=64,
                 lsh_chunk_length=64, num_clusters=16, num_routing_heads=2)
# the windowed and block-sparse patterns have FlexAttention kernels; everything else runs SDPA
FLEX_MIXERS = {"sliding", "block_sparse"}
MFU_SIZE = dict(num_hidden_layers=12, hidden_size=1024, num_attention_heads=16, intermediate_size=4096, vocab_size=259,
                hidden_dropout_prob=0.0, attention_dropout=0.0)
BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM), FLOP/s


def implementation_for(config, training_on_cpu: bool = False) -> str:
    """FlexAttention for the windowed / block-sparse patterns (its CPU kernel has no backward: SDPA there)."""
    return "flex_attention" if FLEX_MIXERS & set(config.mixers) and not training_on_cpu else "sdpa"


def preset_config(name: str, size: dict[str, Any], mechanism: dict[str, Any]) -> LongLMConfig:
    fields = shrunk_preset(name, size, mechanism)
    return LongLMConfig.from_preset(name, **fields)


def parity(device: str, record: Callable[[dict], None]) -> None:
    """Every preset at test size: the device path (bf16-free, float32, its backend) against the CPU eager
    reference in float64, on real bytes; max |logit difference| reported, and whether it is below 1e-3."""
    ids = real_byte_tokens(str(DATA), 2, 256, "cpu")
    for name in sorted(PRESETS.names()):
        torch.manual_seed(0)
        config = tiny_preset_config(name, attn_implementation="eager")
        reference = LongLMForCausalLM(config).double().eval()
        with torch.no_grad():
            want = reference(ids).logits
        fast = LongLMForCausalLM(config).eval()
        fast.load_state_dict(reference.state_dict())
        fast.set_attn_implementation(implementation_for(config))
        fast = fast.float().to(device)
        with torch.no_grad():
            got = fast(ids.to(device)).logits.double().cpu()
        diff = float((got - want).abs().max())
        record({"section": "parity", "preset": name, "backend": implementation_for(config), "max_abs_diff": diff,
                "ok": diff < 1e-3})


def _steps(model, ids: torch.Tensor, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """(tokens/s, peak GiB) of fwd+bwd+AdamW on `ids`, memory carried between steps, bf16 autocast."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    memory = None
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for index in range(warmup + steps):
        if index == warmup:
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids, memory=memory)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory = None if out.memory is None else out.memory.detach()
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
    return ids.numel() * steps / seconds, peak


def throughput(device: str, lengths: list[int], size: dict, mechanism: dict, steps: int, warmup: int,
               record: Callable[[dict], None]) -> None:
    for name in sorted(PRESETS.names()):
        for length in lengths:
            torch.manual_seed(0)
            config = preset_config(name, size, mechanism)
            config._attn_implementation = implementation_for(config, training_on_cpu=device == "cpu")
            row = {"section": "throughput", "preset": name, "tokens_per_step": length, "backend": config._attn_implementation}
            try:
                model = LongLMForCausalLM(config).to(device).train()
                ids = real_byte_tokens(str(DATA), 1, length, device)
                tokens_per_s, peak = _steps(model, ids, steps, warmup, device)
                row.update(tokens_per_s=tokens_per_s, peak_gib=peak, parameters=num_params(model))
            except torch.cuda.OutOfMemoryError as error:  # a measured outcome, reported as such
                row.update(error=f"out of memory: {str(error).splitlines()[0]}")
            finally:
                model = None
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            record(row)


def attention_flops_per_token(config, length: int) -> float:
    """Forward+backward FLOPs per token of the score and value products (3 x 4 x keys x width per layer),
    keys = what a query attends: half the segment causal (full), the window (sliding)."""
    window = getattr(config, "attention_window", length)
    keys = length / 2 if set(config.mixers) == {"full"} else min(window, length) / 2
    return 12 * config.num_hidden_layers * config.hidden_size * keys


def mfu(device: str, length: int, size: dict, steps: int, warmup: int, record: Callable[[dict], None]) -> None:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = next((value for key, value in BF16_PEAK.items() if key in gpu), None)
    for name in ("full", "longformer"):
        torch.manual_seed(0)
        config = preset_config(name, size, {"attention_window": 512})
        config._attn_implementation = implementation_for(config, training_on_cpu=device == "cpu")
        model = LongLMForCausalLM(config).to(device).train()
        ids = real_byte_tokens(str(DATA), 1, length, device)
        tokens_per_s, peak_gib = _steps(model, ids, steps, warmup, device)
        params = num_params(model)
        flops = tokens_per_s * (6 * params + attention_flops_per_token(config, length))
        record({"section": "mfu", "preset": name, "tokens_per_step": length, "parameters": params,
                "tokens_per_s": tokens_per_s, "model_flops_per_s": flops, "peak_gib": peak_gib,
                "mfu": None if peak is None else flops / peak, "gpu": gpu})
        model = None


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    parity_rows = [r for r in rows if r["section"] == "parity"]
    if parity_rows:
        lines += ["## Parity: device path vs CPU eager float64 (tiny presets, 2 x 256 real bytes)", "",
                  "| preset | backend | max abs logit diff | < 1e-3 |", "|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['backend']} | {r['max_abs_diff']:.2e} | {r['ok']} |" for r in parity_rows]
    thr = [r for r in rows if r["section"] == "throughput"]
    if thr:
        lines += ["", "## bf16 training, fwd+bwd+AdamW, batch 1 (4 layers, d=256, 4 heads)", "",
                  "| preset | backend | tokens/step | tokens/s | peak GiB |", "|---|---|---|---|---|"]
        for r in thr:
            cell = r.get("error") or f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f}"
            lines.append(f"| {r['preset']} | {r['backend']} | {r['tokens_per_step']} | {cell} |")
    mfu_rows = [r for r in rows if r["section"] == "mfu"]
    if mfu_rows:
        lines += ["", "## Model FLOPs utilisation (12 layers, d=1024, bf16; target >= 45% of the bf16 peak)", "",
                  "| preset | tokens/step | parameters | tokens/s | model TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
        for r in mfu_rows:
            share = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {r['preset']} | {r['tokens_per_step']} | {r['parameters']:,} | {r['tokens_per_s']:,.0f} | "
                         f"{r['model_flops_per_s'] / 1e12:.1f} | {share} |")
    return "\n".join(lines) + "\n"


DATA = REPO / ".device-data" / "enwiki_sample.xml"


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", nargs="+", default=["parity", "throughput", "mfu"], choices=["parity", "throughput", "mfu"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="raw byte file (default: .device-data/ or ../shared's sample)")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check that every section runs")
    args = parser.parse_args()
    shared = REPO.parent / "shared" / "data" / "enwik8-sample" / "enwiki_sample.xml"
    DATA = args.data or (DATA if DATA.exists() else shared)
    if not DATA.exists():
        parser.error(f"no benchmark data: '{DATA}' is missing; copy ../shared's enwik8 sample to .device-data/ (run.sh does).")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("this run needs a CUDA device; use --smoke to check the script on CPU.")
    size, mechanism, mfu_size = SIZE, MECHANISM, MFU_SIZE
    lengths, mfu_length = args.lengths, 8192
    if args.smoke:
        size = dict(SIZE, num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
        mechanism = dict(MECHANISM, mem_len=32, cmem_len=16, knn_memory_size=256, attention_window=32, block_size=16,
                         num_buckets=8, lsh_chunk_length=16, num_clusters=4, num_memory_tokens=4)
        mfu_size, lengths, mfu_length = size, [256], 256
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    jsonl = args.out / "device-check.jsonl"
    jsonl.write_text("")

    def record(row: dict) -> None:
        rows.append(row)
        with jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU smoke ({platform.machine()})"
    header = (f"# Device check\n\nDate: {datetime.date.today()}. Device: {gpu}, torch {torch.__version__}. "
              f"Command: `python benchmarks/gpu/device_check.py {' '.join(sys.argv[1:])}`")
    if "parity" in args.sections:
        parity(device, record)
    if "throughput" in args.sections:
        throughput(device, lengths, size, mechanism, args.steps, args.warmup, record)
    if "mfu" in args.sections:
        mfu(device, mfu_length, mfu_size, args.steps, args.warmup, record)
    (args.out / "device-check.md").write_text(markdown(rows, header))
    print(f"wrote {args.out / 'device-check.md'}")


if __name__ == "__main__":
    main()
