"""longlm `transformer-xl` vs lucidrains x-transformers `XLAutoregressiveWrapper`, training, side by side.

Run with the benchmark venv (x-transformers lives only there, see benchmarks/README.md):

    benchmarks/.venv/bin/python benchmarks/compare_xtransformers.py --total-lens 1024 4096 8192 \
        --segment 512 --mem-len 512 --steps 5 --warmup 1

Both models: 4 layers, d=256, 4 heads of 64, FFN 1024 (ReLU ours / GELU theirs, both with biases), post-norm,
byte vocabulary (259) with tied input/output embeddings, no dropout, segment 512, memory 512 hidden states
per layer (detached between segments). Positions: ours is Transformer-XL's relative attention (sinusoids
through a per-layer W_r, u/v biases); theirs is x-transformers' closest relative setting, the T5
bucketed bias (`rel_pos_bias=True`), which extends over the memory like ours does.

A training step processes one sequence of `total_len + 1` tokens (`total_len` predicted tokens):

* theirs: `loss = XLAutoregressiveWrapper(seq)` (it splits the sequence into `segment`-long chunks and
  carries detached mems), `loss.backward()`, `AdamW.step()`, as the wrapper is meant to be driven;
* ours: the same sequence cut into the same segments; for each segment forward with the memory of the
  previous one (detached by the model), `loss.backward()`, `AdamW.step()` (Transformer-XL's
  segment-recurrent training; the memory starts empty for each sequence, as theirs does).

So both attend over the same [memory; segment] shapes for every token. Differences that stay: ours adds the
Transformer-XL position term ((q + v) . W_r R, one more L x K matmul per layer) and one optimizer step per
segment; theirs adds the T5 bucket lookup, one optimizer step per sequence, and keeps every segment's autograd
graph alive until its single backward (so its memory grows with the sequence length; ours does not).
Throughput = predicted tokens of the timed steps / their wall time.

Two phases per length, each in fresh subprocesses:

* speed: both models in one process, their training steps interleaved (ours, theirs, theirs, ours, ...), so
  each pair of steps sees the same machine load (the CPU may be shared with other jobs); tokens/s from the
  median step time, plus the best step and the median of the per-pair ratios;
* memory: each implementation alone in a fresh process, peak RSS growth (ru_maxrss after - before building
  the model) over `--mem-steps` sequences on CPU, `torch.cuda.max_memory_allocated` on CUDA.

Prints a table, the ours/theirs ratios, and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from statistics import median
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from side_by_side import measure_peak_memory, print_tables, ratio_row, summary_entry  # noqa: E402
from train_throughput import (  # noqa: E402
    DEFAULT_DATA,
    real_byte_tokens,
    available_cores,
    environment,
    num_params,
    run_in_subprocess,
    setup_torch,
    sync,
    system_busy_seconds,
)

CLEAN_OTHERS_FRACTION = 0.10  # a step is "clean" when other processes used < 10% of the machine meanwhile

WORKER_FLAG = "--_worker"


def build_ours(args: argparse.Namespace, device: str):
    from longlm.configuration_longlm import LongLMConfig
    from longlm.modeling_longlm import LongLMForCausalLM

    config = LongLMConfig.from_preset(
        "transformer-xl",
        num_hidden_layers=args.layers,
        hidden_size=args.dim,
        num_attention_heads=args.heads,
        intermediate_size=args.dim * args.ff_mult,
        vocab_size=args.vocab,
        mem_len=args.mem_len,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
    )
    return LongLMForCausalLM(config).to(device).train()


def build_theirs(args: argparse.Namespace, device: str):
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.xl_autoregressive_wrapper import XLAutoregressiveWrapper

    positions = {
        "t5": dict(rel_pos_bias=True),  # T5 bucketed relative bias: the closest to Transformer-XL's relative scheme
        "dynamic": dict(dynamic_pos_bias=True),  # MLP over relative distances
        "rotary-flash": dict(rotary_pos_emb=True, attn_flash=True),  # not relative bias; SDPA kernel (reference only)
    }[args.xt_positions]
    net = TransformerWrapper(
        num_tokens=args.vocab,
        max_seq_len=args.segment,
        max_mem_len=args.mem_len,
        tie_embedding=True,
        attn_layers=Decoder(
            dim=args.dim,
            depth=args.layers,
            heads=args.heads,
            attn_dim_head=args.dim // args.heads,
            ff_mult=args.xt_ff_mult if args.xt_ff_mult is not None else args.ff_mult,
            pre_norm=args.xt_pre_norm,
            **positions,
        ),
    )
    return XLAutoregressiveWrapper(net).to(device).train()


def make_step(impl: str, model, optimizer, args: argparse.Namespace, total_len: int):
    """A callable that trains on one (batch, total_len + 1) sequence and returns the last loss."""
    if impl == "longlm":

        def step(seq):
            memory = None
            for start in range(0, total_len, args.segment):
                end = min(start + args.segment, total_len)
                out = model(input_ids=seq[:, start:end], memory=memory, shift_labels=seq[:, start + 1 : end + 1])
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                memory = out.memory
            return out.loss

    else:

        def step(seq):
            loss = model(seq)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    return step


def build(impl: str, args: argparse.Namespace, device: str):
    import torch

    model = build_ours(args, device) if impl == "longlm" else build_theirs(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, optimizer


def speed_worker(args: argparse.Namespace, total_len: int) -> dict[str, Any]:
    """Both implementations in one process, steps interleaved ABBA, so each pair sees the same machine load."""
    torch, threads, device = setup_torch(args.threads, args.device)
    torch.manual_seed(args.seed)
    steps = args.warmup + args.steps
    data = real_byte_tokens(args.data, steps * args.batch, total_len + 1, device).view(steps, args.batch, total_len + 1)
    impls = ("longlm", "x-transformers")
    models, runners = {}, {}
    for impl in impls:
        model, optimizer = build(impl, args, device)
        models[impl] = model
        runners[impl] = make_step(impl, model, optimizer, args, total_len)
    wall: dict[str, list[float]] = {impl: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl: [] for impl in impls}
    others: dict[str, list[float]] = {impl: [] for impl in impls}
    cores = available_cores()
    losses: dict[str, float] = {}
    loads = []
    for step in range(steps):
        order = impls if step % 2 == 0 else impls[::-1]
        for impl in order:
            sync(torch, device)
            w0, c0, b0 = time.perf_counter(), time.process_time(), system_busy_seconds()
            loss = runners[impl](data[step])
            sync(torch, device)
            w1, c1, b1 = time.perf_counter(), time.process_time(), system_busy_seconds()
            wall[impl].append(w1 - w0)
            cpu[impl].append(c1 - c0)
            # share of the machine's CPU time that other processes took during this step
            others[impl].append(max(0.0, (b1 - b0) - (c1 - c0)) / (cores * (w1 - w0)) if b0 is not None else 0.0)
            losses[impl] = loss.item()
        loads.append(os.getloadavg()[0])
    rows = []
    for impl in impls:
        timed, timed_cpu = wall[impl][args.warmup :], cpu[impl][args.warmup :]
        timed_others = others[impl][args.warmup :]
        clean = [t for t, o in zip(timed, timed_others) if o < CLEAN_OTHERS_FRACTION]
        tokens = args.batch * total_len
        rows.append(
            {
                "impl": impl,
                "total_len": total_len,
                "params": num_params(models[impl]),
                "steps": len(timed),
                "step_s": [round(t, 4) for t in timed],
                "tokens_per_s": tokens / median(timed),
                "tokens_per_s_best": tokens / min(timed),
                "tokens_per_cpu_s": tokens / median(timed_cpu),
                "others_cpu_fraction": [round(o, 3) for o in timed_others],
                "clean_steps": len(clean),
                "tokens_per_s_clean": tokens / median(clean) if clean else float("nan"),
                "final_loss": losses[impl],
            }
        )
    pair_ratios = [t / o for o, t in zip(wall["longlm"][args.warmup :], wall["x-transformers"][args.warmup :])]
    return {
        "total_len": total_len,
        "rows": rows,
        "pair_speed_ratios": [round(r, 3) for r in pair_ratios],
        "loadavg_1m": loads,
        "threads": threads,
        "device": device,
    }


def memory_worker(args: argparse.Namespace, impl: str, total_len: int) -> dict[str, Any]:
    """One implementation alone in a fresh process: peak memory of `--mem-steps` training steps."""
    torch, threads, device = setup_torch(args.threads, args.device)
    torch.manual_seed(args.seed)
    data = real_byte_tokens(args.data, args.mem_steps * args.batch, total_len + 1, device).view(
        args.mem_steps, args.batch, total_len + 1
    )

    def build_step():
        model, optimizer = build(impl, args, device)
        return make_step(impl, model, optimizer, args, total_len)

    peak, kind, times = measure_peak_memory(torch, device, build_step, data)
    return {"impl": impl, "total_len": total_len, "peak_mem_mb": peak, "memory_kind": kind, "step_s": times}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-lens", dest="total_lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--mem-len", dest="mem_len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff-mult", dest="ff_mult", type=int, default=4, help="FFN inner size = dim * ff_mult (both)")
    parser.add_argument(
        "--xt-ff-mult", dest="xt_ff_mult", type=float, help="override x-transformers' ff_mult only (e.g. 4.5 to match params)"
    )
    parser.add_argument(
        "--xt-positions",
        dest="xt_positions",
        choices=["t5", "dynamic", "rotary-flash"],
        default="t5",
        help="x-transformers positions: t5 = rel_pos_bias (default, TXL-like); others for reference only",
    )
    parser.add_argument("--xt-pre-norm", dest="xt_pre_norm", action="store_true", help="x-transformers pre-norm (default post)")
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--data", default=DEFAULT_DATA, help="raw byte file whose train split feeds the steps")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed sequences per implementation (speed phase)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sequences per implementation first")
    parser.add_argument("--mem-steps", dest="mem_steps", type=int, default=2, help="sequences per memory-phase run")
    parser.add_argument("--skip-memory", dest="skip_memory", action="store_true", help="speed phase only")
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(WORKER_FLAG, dest="worker", nargs=2, metavar=("KIND", "TOTAL_LEN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker:
        kind, total_len = args.worker[0], int(args.worker[1])
        result = speed_worker(args, total_len) if kind == "speed" else memory_worker(args, kind, total_len)
        print(json.dumps(result), flush=True)
        return
    torch, threads, device = setup_torch(args.threads, args.device)
    env = environment(device, threads)
    env["x_transformers"] = metadata.version("x-transformers")
    env["longlm"] = metadata.version("longlm")
    env["python_executable"] = sys.executable
    env["command"] = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__), *raw])
    me = os.path.abspath(__file__)
    wall0 = time.perf_counter()
    speed, memory = {}, {}
    for total_len in args.total_lens:
        speed[total_len] = result = run_in_subprocess([me, *raw, WORKER_FLAG, "speed", str(total_len)])
        for row in result["rows"]:
            print(
                f"# speed {row['impl']:>14} len {total_len:>5}: {row['tokens_per_s']:7.0f} tok/s median, "
                f"{row['tokens_per_s_best']:7.0f} best, {row['tokens_per_s_clean']:7.0f} clean ({row['clean_steps']}), "
                f"steps {row['step_s']}, others' CPU share {row['others_cpu_fraction']}",
                file=sys.stderr,
                flush=True,
            )
        print(f"#   pair ratios {result['pair_speed_ratios']} load {result['loadavg_1m']}", file=sys.stderr, flush=True)
        if args.skip_memory:
            continue
        for impl in ("longlm", "x-transformers"):
            memory[(impl, total_len)] = row = run_in_subprocess([me, *raw, WORKER_FLAG, impl, str(total_len)])
            print(f"# memory {impl:>14} len {total_len:>5}: {row['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary, ratios = [], []
    for total_len in args.total_lens:
        by_impl = {}
        for row in speed[total_len]["rows"]:
            mem = memory.get((row["impl"], total_len))
            entry = summary_entry(
                row,
                total_len,
                -(-total_len // args.segment),
                mem["peak_mem_mb"] if mem else float("nan"),
                tokens_per_cpu_s=row["tokens_per_cpu_s"],
            )
            summary.append(entry)
            by_impl[row["impl"]] = entry
        ours, theirs = by_impl["longlm"], by_impl["x-transformers"]
        ratios.append(
            ratio_row(ours, theirs, speed[total_len]["pair_speed_ratios"], ours=ours["tokens_per_s"], theirs=theirs["tokens_per_s"])
        )
    print(
        f"device={device} threads={threads} nproc={available_cores()} cpu={env['cpu']} torch={env['torch']} "
        f"x-transformers={env['x_transformers']} segment={args.segment} mem={args.mem_len} batch={args.batch} "
        f"steps={args.steps} warmup={args.warmup}"
    )
    print_tables(summary, ratios, device)
    print(f"# wall time {time.perf_counter() - wall0:.0f} s", file=sys.stderr)
    result = {"benchmark": "compare_xtransformers", "env": env, "args": vars(args), "summary": summary, "ratios": ratios}
    result["speed_runs"] = list(speed.values())
    result["memory_runs"] = list(memory.values())
    print(json.dumps(result, default=str).replace("NaN", "null"))


if __name__ == "__main__":
    main()
