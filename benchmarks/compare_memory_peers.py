"""longlm memory presets vs lucidrains' reference implementations, training, side by side.

Run with the benchmark venv (the peers live only there, see benchmarks/README.md):

    benchmarks/.venv/bin/python benchmarks/compare_memory_peers.py --pairs compressive memorizing rmt \
        --total-lens 1024 4096 8192 --steps 3 --warmup 1

Three pairs, all at the same size: 4 layers, d=256, 4 heads of 64, FFN 4*d, byte vocabulary 259, segment 512,
no dropout. Each step trains on one sequence of `total_len + 1` real bytes (ByT5 ids, train split of
../shared/data/enwik8-sample), so `total_len` tokens are predicted by both sides; tokens/s = total_len /
step wall time (median step; best step and "clean" steps also reported).

* `compressive`: ours = preset `compressive` (relative attention over [cmem; mem; segment], conv
  compression trained by the attention-reconstruction loss), mem_len 512, cmem_len 512, rate 4;
  theirs = `compressive_transformer_pytorch.AutoregressiveWrapper(CompressiveTransformer(seq_len=512,
  mem_len=512, cmem_len=512, cmem_ratio=4, gru_gated_residual=False))`. Per step, both: for each 512-token
  segment, forward with the (detached) memory of the previous one, (LM + reconstruction loss).backward(),
  AdamW.step(): theirs exactly as its README loop (the wrapper yields one loss per segment).
* `memorizing`: ours = preset `memorizing` with the kNN layer in the middle (index depth//2 - 1, their
  default layer depth//2 counted from 1), knn_memory_size 8192, top-32, XL cache 512 in every layer;
  theirs = `MemorizingTransformer(memorizing_layers=depth//2, max_knn_memories=8192,
  num_retrieved_memories=32, xl_max_memories=512)` driven as its train.py: a fresh
  `knn_memories_context` per sequence, segment by segment with the XL memories carried. Per step, both:
  per segment forward, backward, AdamW.step() (their train.py accumulates the segments and steps once per
  sequence; here both step per segment, as our trainer does).
* `rmt`: ours = preset `rmt`, 16 memory tokens, mem_len 0, bptt_depth = the segments of one sequence
  (or `--rmt-bptt`); theirs = `RecurrentMemoryTransformerWrapper(RecurrentMemoryTransformer(
  num_memory_tokens=16, seq_len=512, use_xl_memories=False, num_residual_streams=1,
  use_flash_attn=True))`. Per step, both: the whole sequence is one gradient window (their wrapper's
  default: truncate_at_step=None), one backward pass through all segments and the memory between them, one
  AdamW.step(). Theirs uses memory-replay backprop (`memory_replay_backprop=True`, as its train.py) by
  default (`--rmt-mode plain`: `return_loss=True` then `.backward()`). With `--rmt-bptt K` both train windows
  of K segments (theirs: plain mode, the wrapper called per window with the memories carried).

Two phases per pair and length, each in fresh subprocesses (as compare_xtransformers.py):

* speed: both models in one process, steps interleaved (ours, theirs, theirs, ours, ...), tokens/s from the
  median step, plus best step, clean steps (other processes < 10% of the machine's CPU meanwhile) and the
  median of per-pair ratios;
* memory: each implementation alone in a fresh process for `--mem-steps` sequences: peak RSS growth
  (ru_maxrss after - before building the model) on CPU, `max_memory_allocated` on CUDA.

Prints per-implementation rows, the ours/theirs ratios, and a final JSON line
(`"benchmark": "compare_memory_peers"`); `--jsonl PATH` also appends that line to PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from statistics import median
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_xtransformers import CLEAN_OTHERS_FRACTION, make_step as xl_segment_step  # noqa: E402
from side_by_side import measure_peak_memory, print_tables, ratio_row, summary_entry  # noqa: E402
from train_throughput import (  # noqa: E402
    DEFAULT_DATA,
    available_cores,
    environment,
    num_params,
    real_byte_tokens,
    run_in_subprocess,
    setup_torch,
    sync,
    system_busy_seconds,
)

WORKER_FLAG = "--_worker"
PAIRS = {
    "compressive": ("longlm", "compressive-transformer-pytorch"),
    "memorizing": ("longlm", "memorizing-transformers-pytorch"),
    "rmt": ("longlm", "recurrent-memory-transformer-pytorch"),
}
PEER_PACKAGES = ["compressive-transformer-pytorch", "memorizing-transformers-pytorch", "recurrent-memory-transformer-pytorch"]

Step = Callable[[Any], Any]  # trains on one (batch, total_len + 1) sequence, returns the last loss


def segments_of(args: argparse.Namespace, total_len: int) -> int:
    return -(-total_len // args.segment)


def rmt_window(args: argparse.Namespace, total_len: int) -> int:
    """Segments per gradient window (bptt_depth): `--rmt-bptt`, or 0 = the whole sequence."""
    return args.rmt_bptt or segments_of(args, total_len)


# --------------------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------------------
def ours_config(pair: str, args: argparse.Namespace, total_len: int):
    from longlm.configuration_longlm import LongLMConfig

    common = dict(
        num_hidden_layers=args.layers,
        hidden_size=args.dim,
        num_attention_heads=args.heads,
        intermediate_size=args.dim * args.ff_mult,
        vocab_size=args.vocab,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
    )
    if pair == "compressive":
        extra = dict(mem_len=args.mem_len, cmem_len=args.cmem_len, compression_rate=args.rate, compression_fn="conv")
    elif pair == "memorizing":
        extra = dict(
            mem_len=args.mem_len,
            layer_mixers=["knn" if i == args.layers // 2 - 1 else "relative" for i in range(args.layers)],
            knn_memory_size=args.knn_memory_size,
            knn_top_k=args.knn_top_k,
            knn_backend=args.knn_backend,
        )
    else:
        extra = dict(mem_len=0, num_memory_tokens=args.memory_tokens, bptt_depth=rmt_window(args, total_len))
    return LongLMConfig.from_preset(pair, **common, **extra)


def build_ours(pair: str, args: argparse.Namespace, device: str, total_len: int):
    import torch

    from longlm.modeling_longlm import LongLMForCausalLM

    config = ours_config(pair, args, total_len)
    model = LongLMForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if pair != "rmt":
        # per 512-token segment: forward with the memory of the previous segment, backward, AdamW step
        return model, xl_segment_step("longlm", model, optimizer, args, total_len), {}
    window = config.bptt_depth

    def step(seq):
        # bptt windows of `window` segments: the memory stays in the graph inside a window (mean segment loss,
        # one backward, one AdamW step) and is detached between windows, as CausalLMPretraining does
        memory, starts = None, list(range(0, total_len, args.segment))
        for first in range(0, len(starts), window):
            losses = []
            for index, start in enumerate(starts[first : first + window]):
                end = min(start + args.segment, total_len)
                out = model(input_ids=seq[:, start:end], memory=memory, shift_labels=seq[:, start + 1 : end + 1])
                last = index == len(starts[first : first + window]) - 1
                memory = out.memory.detach() if last else out.memory
                losses.append(out.loss)
            loss = torch.stack(losses).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, {"bptt_depth": window}


# --------------------------------------------------------------------------------------------------
# theirs
# --------------------------------------------------------------------------------------------------
def build_theirs(pair: str, args: argparse.Namespace, device: str, total_len: int):
    import torch

    cleanup: list[Callable[[], None]] = []
    info: dict[str, Any] = {}
    if pair == "compressive":
        from compressive_transformer_pytorch import AutoregressiveWrapper, CompressiveTransformer

        net = CompressiveTransformer(
            num_tokens=args.vocab,
            dim=args.dim,
            seq_len=args.segment,
            depth=args.layers,
            heads=args.heads,
            mem_len=args.mem_len,
            cmem_len=args.cmem_len,
            cmem_ratio=args.rate,
            gru_gated_residual=args.ct_gru,
        )
        model = AutoregressiveWrapper(net).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

        def step(seq):
            # the wrapper cuts the sequence into seq_len segments and yields each one's loss (README loop)
            for lm_loss, aux_loss, is_last in model(seq, return_loss=True):
                (lm_loss + aux_loss).backward()
                if is_last:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            return lm_loss

    elif pair == "memorizing":
        import faiss
        from memorizing_transformers_pytorch import MemorizingTransformer

        faiss.omp_set_num_threads(torch.get_num_threads())
        knn_dir = tempfile.mkdtemp(prefix="memorizing-peer-")
        cleanup.append(lambda: shutil.rmtree(knn_dir, ignore_errors=True))
        model = MemorizingTransformer(
            num_tokens=args.vocab,
            dim=args.dim,
            depth=args.layers,
            dim_head=args.dim // args.heads,
            heads=args.heads,
            ff_mult=args.ff_mult,
            memorizing_layers=args.layers // 2,
            max_knn_memories=args.knn_memory_size,
            num_retrieved_memories=args.knn_top_k,
            xl_max_memories=args.mem_len,
            knn_memories_directory=knn_dir,
        ).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        info["faiss"] = faiss.__version__

        def step(seq):
            # as its train.py: a fresh kNN memory per sequence, segments in order with the XL memories carried
            with model.knn_memories_context(batch_size=seq.shape[0]) as knn_memories:
                xl_memories = None
                for start in range(0, total_len, args.segment):
                    end = min(start + args.segment, total_len)
                    loss, xl_memories = model(
                        seq[:, start:end], labels=seq[:, start + 1 : end + 1], knn_memories=knn_memories, xl_memories=xl_memories
                    )
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            return loss

    else:
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

        net = RecurrentMemoryTransformer(
            args.dim,
            num_tokens=args.vocab,
            depth=args.layers,
            num_memory_tokens=args.memory_tokens,
            seq_len=args.segment,
            dim_head=args.dim // args.heads,
            heads=args.heads,
            ff_mult=args.ff_mult,
            use_xl_memories=False,
            use_flash_attn=args.rmt_flash,
            num_residual_streams=args.rmt_streams,
        )
        model = RecurrentMemoryTransformerWrapper(net).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        window = rmt_window(args, total_len)
        mode = args.rmt_mode if window >= segments_of(args, total_len) else "plain"
        info.update(bptt_depth=window, rmt_mode=mode)

        if mode == "mrbp":

            def step(seq):
                loss = model(seq, memory_replay_backprop=True)  # backward happens inside (memory replay)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss

        else:
            span = window * args.segment

            def step(seq):
                memories = None
                for start in range(0, total_len, span):
                    end = min(start + span, total_len)
                    loss, memories = model(seq[:, start : end + 1], memories, return_loss=True)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    memories = memories.detach()
                return loss

    info["cleanup"] = cleanup
    return model, step, info


def build(pair: str, impl: str, args: argparse.Namespace, device: str, total_len: int):
    return (build_ours if impl == "longlm" else build_theirs)(pair, args, device, total_len)


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------
def sequences(args: argparse.Namespace, count: int, total_len: int, device: str):
    return real_byte_tokens(args.data, count * args.batch, total_len + 1, device).view(count, args.batch, total_len + 1)


def speed_worker(args: argparse.Namespace, pair: str, total_len: int) -> dict[str, Any]:
    """Both implementations in one process, steps interleaved ABBA, so each pair sees the same machine load."""
    torch, threads, device = setup_torch(args.threads, args.device)
    torch.manual_seed(args.seed)
    steps = args.warmup + args.steps
    data = sequences(args, steps, total_len, device)
    impls = PAIRS[pair]
    models, runners, infos = {}, {}, {}
    for impl in impls:
        models[impl], runners[impl], infos[impl] = build(pair, impl, args, device, total_len)
    wall: dict[str, list[float]] = {impl: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl: [] for impl in impls}
    others: dict[str, list[float]] = {impl: [] for impl in impls}
    losses: dict[str, float] = {}
    cores = available_cores()
    for step in range(steps):
        for impl in impls if step % 2 == 0 else impls[::-1]:
            sync(torch, device)
            w0, c0, b0 = time.perf_counter(), time.process_time(), system_busy_seconds()
            loss = runners[impl](data[step])
            sync(torch, device)
            w1, c1, b1 = time.perf_counter(), time.process_time(), system_busy_seconds()
            wall[impl].append(w1 - w0)
            cpu[impl].append(c1 - c0)
            others[impl].append(max(0.0, (b1 - b0) - (c1 - c0)) / (cores * (w1 - w0)) if b0 is not None else 0.0)
            losses[impl] = float(loss)
    for info in infos.values():
        for fn in info.pop("cleanup", []):
            fn()
    rows = []
    tokens = args.batch * total_len
    for impl in impls:
        timed, timed_cpu, timed_others = wall[impl][args.warmup :], cpu[impl][args.warmup :], others[impl][args.warmup :]
        clean = [t for t, o in zip(timed, timed_others) if o < CLEAN_OTHERS_FRACTION]
        rows.append(
            {
                "impl": impl,
                "pair": pair,
                "total_len": total_len,
                "params": num_params(models[impl]),
                "steps": len(timed),
                "step_s": [round(t, 4) for t in timed],
                "warmup_step_s": [round(t, 4) for t in wall[impl][: args.warmup]],
                "tokens_per_s": tokens / median(timed),
                "tokens_per_s_best": tokens / min(timed),
                "tokens_per_cpu_s": tokens / median(timed_cpu),
                "others_cpu_fraction": [round(o, 3) for o in timed_others],
                "clean_steps": len(clean),
                "tokens_per_s_clean": tokens / median(clean) if clean else float("nan"),
                "final_loss": losses[impl],
                **infos[impl],
            }
        )
    ours, theirs = (wall[impl][args.warmup :] for impl in impls)
    return {
        "pair": pair,
        "total_len": total_len,
        "rows": rows,
        "pair_speed_ratios": [round(t / o, 3) for o, t in zip(ours, theirs)],
        "loadavg_1m": os.getloadavg()[0],
        "threads": threads,
        "device": device,
    }


def memory_worker(args: argparse.Namespace, pair: str, impl: str, total_len: int) -> dict[str, Any]:
    """One implementation alone in a fresh process: peak memory over `--mem-steps` training sequences."""
    torch, threads, device = setup_torch(args.threads, args.device)
    torch.manual_seed(args.seed)
    data = sequences(args, args.mem_steps, total_len, device)
    built = {}

    def build_step():
        built["model"], run, built["info"] = build(pair, impl, args, device, total_len)
        return run

    peak, kind, times = measure_peak_memory(torch, device, build_step, data)
    info = built["info"]
    for fn in info.pop("cleanup", []):
        fn()
    return {"pair": pair, "impl": impl, "total_len": total_len, "peak_mem_mb": peak, "memory_kind": kind, "step_s": times}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--total-lens", dest="total_lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff-mult", dest="ff_mult", type=int, default=4, help="FFN inner size = dim * ff_mult")
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--mem-len", dest="mem_len", type=int, default=512, help="XL memory (compressive, memorizing)")
    parser.add_argument("--cmem-len", dest="cmem_len", type=int, default=512, help="compressed memory (compressive)")
    parser.add_argument("--rate", type=int, default=4, help="compression rate (compressive)")
    parser.add_argument("--ct-gru", dest="ct_gru", action="store_true", help="theirs compressive: GRU-gated residuals (its default)")
    parser.add_argument("--knn-memory-size", dest="knn_memory_size", type=int, default=8192)
    parser.add_argument("--knn-top-k", dest="knn_top_k", type=int, default=32)
    parser.add_argument("--knn-backend", dest="knn_backend", choices=["torch", "faiss"], default="torch", help="ours")
    parser.add_argument("--memory-tokens", dest="memory_tokens", type=int, default=16, help="RMT memory tokens")
    parser.add_argument("--rmt-bptt", dest="rmt_bptt", type=int, default=0, help="segments per RMT gradient window (0: all)")
    parser.add_argument("--rmt-mode", dest="rmt_mode", choices=["mrbp", "plain"], default="mrbp", help="theirs RMT backward")
    parser.add_argument("--rmt-streams", dest="rmt_streams", type=int, default=1, help="theirs RMT hyper-connection streams")
    parser.add_argument("--rmt-no-flash", dest="rmt_flash", action="store_false", help="theirs RMT: einsum attention, not SDPA")
    parser.add_argument("--data", default=DEFAULT_DATA, help="raw byte file whose train split feeds the steps")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed sequences per implementation (speed phase)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sequences per implementation first")
    parser.add_argument("--mem-steps", dest="mem_steps", type=int, default=2, help="sequences per memory-phase run")
    parser.add_argument("--skip-memory", dest="skip_memory", action="store_true", help="speed phase only")
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--jsonl", help="also append the final JSON line to this file")
    parser.add_argument(WORKER_FLAG, dest="worker", nargs=3, metavar=("KIND", "PAIR", "TOTAL_LEN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def versions() -> dict[str, str]:
    out = {}
    for name in ["longlm", *PEER_PACKAGES, "faiss-cpu", "einops", "hyper-connections"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker:
        kind, pair, total_len = args.worker[0], args.worker[1], int(args.worker[2])
        result = speed_worker(args, pair, total_len) if kind == "speed" else memory_worker(args, pair, kind, total_len)
        print(json.dumps(result), flush=True)
        return
    torch, threads, device = setup_torch(args.threads, args.device)
    env = environment(device, threads)
    env.update(versions())
    env["python_executable"] = sys.executable
    env["command"] = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__), *raw])
    me = os.path.abspath(__file__)
    wall0 = time.perf_counter()
    summary, ratios, speed_runs, memory_runs = [], [], [], []
    for pair in args.pairs:
        for total_len in args.total_lens:
            run = run_in_subprocess([me, *raw, WORKER_FLAG, "speed", pair, str(total_len)])
            speed_runs.append(run)
            for row in run["rows"]:
                print(
                    f"# {pair:>11} speed {row['impl']:>36} len {total_len:>5}: {row['tokens_per_s']:7.0f} tok/s median, "
                    f"{row['tokens_per_s_best']:7.0f} best, {row['tokens_per_s_clean']:7.0f} clean ({row['clean_steps']}), "
                    f"steps {row['step_s']}, others' CPU {row['others_cpu_fraction']}",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"#   pair ratios {run['pair_speed_ratios']} load {run['loadavg_1m']:.2f}", file=sys.stderr, flush=True)
            mem = {}
            if not args.skip_memory:
                for impl in PAIRS[pair]:
                    mem[impl] = row = run_in_subprocess([me, *raw, WORKER_FLAG, impl, pair, str(total_len)])
                    memory_runs.append(row)
                    print(f"# {pair:>11} memory {impl:>36} len {total_len:>5}: {row['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
            by_impl = {}
            for row in run["rows"]:
                peak = mem[row["impl"]]["peak_mem_mb"] if mem else float("nan")
                entry = summary_entry(row, total_len, segments_of(args, total_len), peak, pair=pair)
                summary.append(entry)
                by_impl[row["impl"]] = entry
            ours, theirs = (by_impl[impl] for impl in PAIRS[pair])
            ratios.append(
                ratio_row(
                    ours,
                    theirs,
                    run["pair_speed_ratios"],
                    pair=pair,
                    ours_tok_s=ours["tokens_per_s"],
                    theirs_tok_s=theirs["tokens_per_s"],
                    ours_params=ours["params"],
                    theirs_params=theirs["params"],
                )
            )
    print(
        f"device={device} threads={threads} nproc={available_cores()} cpu={env['cpu']} torch={env['torch']} "
        + " ".join(f"{k}={env[k]}" for k in PEER_PACKAGES)
        + f" segment={args.segment} batch={args.batch} steps={args.steps} warmup={args.warmup}"
    )
    print_tables(summary, ratios, device, lead=[("pair", "pair", "")])
    print(f"# wall time {time.perf_counter() - wall0:.0f} s", file=sys.stderr)
    result = {
        "benchmark": "compare_memory_peers",
        "env": env,
        "args": vars(args),
        "summary": summary,
        "ratios": ratios,
        "speed_runs": speed_runs,
        "memory_runs": memory_runs,
    }
    line = json.dumps(result, default=str).replace("NaN", "null")
    print(line)
    if args.jsonl:
        with open(args.jsonl, "a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
