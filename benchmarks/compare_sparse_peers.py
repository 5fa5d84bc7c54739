"""longlm sparse-attention presets vs Hugging Face and lucidrains implementations, training, side by side.

Run with the benchmark venv (the peers live only there, see benchmarks/README.md):

    benchmarks/.venv/bin/python benchmarks/compare_sparse_peers.py --total-lens 1024 4096 8192 16384 \
        --steps 2 --warmup 1 --steps-at 16384=1 --warmup-at 16384=0 --mem-steps 1 --wait-quiet 60

Every model: 4 layers, d=256, 4 heads of 64, FFN 1024, byte vocabulary 259 (ByT5 ids), batch
1, no dropout. One training step = forward on `total_len` real bytes (train split of
../shared/data/enwik8-sample), next-token cross-entropy on all `total_len` positions, backward, AdamW step.
Tokens/s = total_len / step wall time (median step; best step and "clean" steps also reported).

Mechanisms (ours = `LongLMForCausalLM(LongLMConfig.from_preset(<mechanism>, <size>, <sparsity>))`, a causal
decoder; `--window`, `--block`, `--random-blocks`, `--chunk`, `--hashes`, `--cluster-window` change the
sparsity on every side):

* `longformer`: every query sees the 256 previous tokens and itself. Ours: attention_window 512 (Longformer's
  convention, w/2 per side; causal keeps the left half). `local-attention`:
  `LocalTransformer(local_attn_window_size=256, causal=True, num_residual_streams=1)` (its own LM, rotary +
  learned absolute positions, GEGLU FFN of the same parameter count). HF `LongformerModel` has no causal mode:
  it is an encoder, run with attention_window 256 (128 per side) so that each query sees the same number of
  keys (257) as ours (`--hf-longformer-window` to change), plus a linear LM head and the same next-token loss.
* `bigbird`: block 64, 3 random blocks. Ours: preset `bigbird` (causal). HF `BigBirdModel(attention_type=
  "block_sparse")` is an encoder (3 sliding + 2 global + 3 random key blocks per query block, both
  directions), plus a linear LM head.
* `reformer`: shared-QK LSH, chunk 64, 2 hashes, num_buckets = total_len / 64 (reformer-pytorch's fixed rule;
  the same number on every side), feed-forward in chunks of 1024 tokens, reversible residuals. Ours: preset
  `reformer` (reversible when the model implements it, see `--ours-reversible`); HF `ReformerModelWithLMHead`
  (attn_layers all "lsh", is_decoder, axial position embeddings whose shape is set to factor each
  total_len, as HF requires in training); `reformer-pytorch` `ReformerLM(causal=True, bucket_size=64,
  n_hashes=2, ff_chunks=total_len/1024)` driven by its `TrainingWrapper`.
* `routing`: local attention (window 256) in every layer; in the last half of the layers half the heads route
  through k-means clusters of 256 tokens (num_clusters = total_len / 256). Ours: preset `routing` with
  `routing` in the last half of `layer_mixers`, num_routing_heads = heads/2; `routing-transformer`
  `RoutingTransformerLM(window_size=256, causal=True, n_local_attn_heads=(4, 4, 2, 2))` driven by its
  `AutoregressiveWrapper` (its loss includes the k-means commitment loss; its EMA update runs on backward).

Two phases per mechanism and length, each in fresh subprocesses (as compare_memory_peers.py):

* speed: every implementation in one process, steps interleaved (A B C, C B A, ...), so each step sees the
  same machine load (`--wait-quiet S`: each step first waits up to S s for other processes to leave the
  CPU); an implementation that raises is recorded with its error and dropped;
* memory: each implementation alone in a fresh process for `--mem-steps` steps: peak RSS growth on CPU,
  `max_memory_allocated` on CUDA.

Prints per-implementation rows, ours/peer ratios, ours vs the best peer with the targets (>= 1.5x the best
peer's tokens/s, memory no higher than any peer's), 4k -> 16k growth ratios, and a final JSON line
(`"benchmark": "compare_sparse_peers"`; `--json PATH` also writes it to PATH).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_xtransformers import CLEAN_OTHERS_FRACTION  # noqa: E402
from side_by_side import measure_peak_memory, print_tables, ratio_row, summary_entry  # noqa: E402
from train_throughput import (  # noqa: E402
    DEFAULT_DATA,
    available_cores,
    environment,
    format_table,
    num_params,
    real_byte_tokens,
    run_in_subprocess,
    setup_torch,
    sync,
    system_busy_seconds,
)

WORKER_FLAG = "--_worker"
MECHANISMS = {
    "longformer": ("longlm", "hf-longformer", "local-attention"),
    "bigbird": ("longlm", "hf-bigbird"),
    "reformer": ("longlm", "hf-reformer", "reformer-pytorch"),
    "routing": ("longlm", "routing-transformer"),
}
SPARSE_MODULES = ("sliding", "block_sparse", "lsh", "routing")  # longlm.attention.<name>, registered on import
PEER_PACKAGES = ["transformers", "local-attention", "reformer-pytorch", "routing-transformer", "axial-positional-embedding"]
SPEED_TARGET = 1.5

Step = Callable[[Any], Any]  # trains on one (batch, total_len + 1) sequence, returns the loss


def import_sparse_mixers() -> dict[str, str]:
    """Import the sparse mixer modules so they register even before `longlm.attention` imports them."""
    import hashlib
    import importlib

    status = {}
    for name in SPARSE_MODULES:
        try:
            module = importlib.import_module(f"longlm.attention.{name}")
            status[name] = "ok, sha1 " + hashlib.sha1(Path(module.__file__).read_bytes()).hexdigest()[:10]
        except Exception as error:  # noqa: BLE001 - reported, not fatal: the `full` stand-in needs none
            status[name] = f"{type(error).__name__}: {error}"
    return status


def source_digest() -> str:
    """One sha1 over longlm's Python files, to tell which version of the mixers a result measured."""
    import hashlib

    import longlm

    digest = hashlib.sha1()
    for path in sorted(Path(longlm.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def reversible_implemented() -> bool:
    """Whether the longlm model (not just the config) reads `config.reversible` (the lead is adding it)."""
    import inspect

    import longlm.modeling_longlm

    return "config.reversible" in inspect.getsource(longlm.modeling_longlm)


# --------------------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------------------
def ours_fields(mechanism: str, args: argparse.Namespace, total_len: int) -> dict[str, Any]:
    """The sparsity fields of the preset, set to the shared comparison values."""
    if args.ours_preset:  # stand-in (e.g. `full`) while the sparse mixers are being written
        return {}
    if mechanism == "longformer":
        return dict(attention_window=2 * args.window, attention_dilation=1)
    if mechanism == "bigbird":
        return dict(block_size=args.block, num_random_blocks=args.random_blocks)
    if mechanism == "reformer":
        reversible = {"auto": reversible_implemented(), "yes": True, "no": False}[args.ours_reversible]
        return dict(
            num_buckets=lsh_buckets(args, total_len),
            num_hashes=args.hashes,
            lsh_chunk_length=args.chunk,
            reversible=reversible,
            feed_forward_chunk_size=args.ff_chunk,
        )
    half = args.layers // 2
    return dict(
        attention_window=2 * args.window,
        layer_mixers=["sliding"] * (args.layers - half) + ["routing"] * half,
        num_clusters=total_len // args.cluster_window,
        num_routing_heads=args.heads // 2,
        kmeans_decay=0.999,
    )


def lsh_buckets(args: argparse.Namespace, total_len: int) -> int:
    return max(2, total_len // args.chunk)


def build_ours(mechanism: str, args: argparse.Namespace, device: str, total_len: int):
    import torch

    from longlm.configuration_longlm import LongLMConfig
    from longlm.modeling_longlm import LongLMForCausalLM

    mixers = import_sparse_mixers()
    fields = ours_fields(mechanism, args, total_len)
    config = LongLMConfig.from_preset(
        args.ours_preset or mechanism,
        num_hidden_layers=args.layers,
        hidden_size=args.dim,
        num_attention_heads=args.heads,
        intermediate_size=args.dim * args.ff_mult,
        vocab_size=args.vocab,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        max_position_embeddings=max(4096, total_len),
        **fields,
    )
    model = LongLMForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step(seq):
        out = model(input_ids=seq[:, :-1], shift_labels=seq[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    info = {"preset": args.ours_preset or mechanism, "mixers": config.mixers, **fields, "sparse_modules": mixers}
    return model, step, info


# --------------------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------------------
def loss_step(optimizer, loss_of: Callable) -> Step:
    """A training step from a function giving the loss of a (batch, total_len + 1) sequence."""

    def step(seq):
        loss = loss_of(seq)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def lm_head_step(optimizer, logits_of: Callable) -> Step:
    """A training step for a peer that returns logits: next-token cross-entropy over every position."""
    import torch.nn.functional as F

    def loss_of(seq):
        logits = logits_of(seq[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())

    return loss_step(optimizer, loss_of)


def axial_shape(total_len: int) -> tuple[int, int]:
    """Two factors of total_len, as square as powers of two allow (HF Reformer needs their product = length)."""
    first = 2 ** (int(math.log2(total_len)) // 2)
    if total_len % first:
        raise ValueError(f"HF Reformer needs axial_pos_shape factors of the length; {total_len} is not a multiple of {first}.")
    return first, total_len // first


def build_peer(mechanism: str, impl: str, args: argparse.Namespace, device: str, total_len: int):
    import torch
    from torch import nn

    info: dict[str, Any] = {}
    head_dim = args.dim // args.heads
    inner = args.dim * args.ff_mult
    if impl in ("hf-longformer", "hf-bigbird"):
        if impl == "hf-longformer":
            from transformers import LongformerConfig, LongformerModel

            window = args.hf_longformer_window or args.window
            config = LongformerConfig(
                attention_window=window,
                max_position_embeddings=total_len + 2,
                pad_token_id=0,
            )
            info.update(attention_window=window)
            encoder_cls = LongformerModel
        else:
            from transformers import BigBirdConfig, BigBirdModel

            config = BigBirdConfig(
                attention_type="block_sparse",
                block_size=args.block,
                num_random_blocks=args.random_blocks,
                max_position_embeddings=total_len,
                pad_token_id=0,
            )
            info.update(block_size=args.block, num_random_blocks=args.random_blocks)
            encoder_cls = BigBirdModel
        config.update(
            dict(
                vocab_size=args.vocab,
                hidden_size=args.dim,
                num_hidden_layers=args.layers,
                num_attention_heads=args.heads,
                intermediate_size=inner,
                hidden_act="gelu",
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
        encoder = encoder_cls(config, add_pooling_layer=False)
        model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(args.dim, args.vocab)}).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        step = lm_head_step(optimizer, lambda ids: model["head"](model["encoder"](input_ids=ids).last_hidden_state))
        # HF BigBird silently switches to full attention for short inputs: report what actually ran
        info["after"] = lambda: {"attention_type": getattr(encoder.config, "attention_type", "sliding_chunks")}
        return model, step, info
    if impl == "hf-reformer":
        from transformers import ReformerConfig, ReformerModelWithLMHead

        shape = axial_shape(total_len)
        config = ReformerConfig(
            attn_layers=["lsh"] * args.layers,
            attention_head_size=head_dim,
            num_attention_heads=args.heads,
            hidden_size=args.dim,
            feed_forward_size=inner,
            hidden_act="gelu",
            vocab_size=args.vocab,
            is_decoder=True,
            axial_pos_embds=True,
            axial_pos_shape=shape,
            axial_pos_embds_dim=(args.dim // 2, args.dim - args.dim // 2),
            max_position_embeddings=total_len,
            lsh_attn_chunk_length=args.chunk,
            lsh_num_chunks_before=1,
            lsh_num_chunks_after=0,
            num_hashes=args.hashes,
            num_buckets=lsh_buckets(args, total_len),
            chunk_size_feed_forward=args.ff_chunk,
            hidden_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = ReformerModelWithLMHead(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        info.update(axial_pos_shape=list(shape), num_buckets=config.num_buckets)
        return model, lm_head_step(optimizer, lambda ids: model(input_ids=ids).logits), info
    if impl == "reformer-pytorch":
        from reformer_pytorch import ReformerLM
        from reformer_pytorch.generative_tools import TrainingWrapper

        ff_chunks = max(1, total_len // args.ff_chunk) if args.ff_chunk else 1
        net = ReformerLM(
            num_tokens=args.vocab,
            dim=args.dim,
            depth=args.layers,
            max_seq_len=total_len,
            heads=args.heads,
            dim_head=head_dim,
            bucket_size=args.chunk,
            n_hashes=args.hashes,
            ff_chunks=ff_chunks,
            ff_mult=args.ff_mult,
            causal=True,
        )
        model = TrainingWrapper(net).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        info.update(bucket_size=args.chunk, n_buckets=total_len // args.chunk, ff_chunks=ff_chunks)
        return model, loss_step(optimizer, lambda seq: model(seq, return_loss=True)), info
    if impl == "local-attention":
        from local_attention import LocalTransformer

        model = LocalTransformer(
            num_tokens=args.vocab,
            max_seq_len=total_len,
            dim=args.dim,
            depth=args.layers,
            causal=True,
            local_attn_window_size=args.window,
            dim_head=head_dim,
            heads=args.heads,
            ff_mult=args.ff_mult,
            num_residual_streams=1,
        ).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        info.update(window_size=args.window)
        return model, loss_step(optimizer, lambda seq: model(seq, return_loss=True)), info
    if impl == "routing-transformer":
        from routing_transformer import AutoregressiveWrapper, RoutingTransformerLM

        half = args.layers // 2
        local_heads = tuple([args.heads] * (args.layers - half) + [args.heads - args.heads // 2] * half)
        net = RoutingTransformerLM(
            num_tokens=args.vocab,
            dim=args.dim,
            depth=args.layers,
            max_seq_len=total_len,
            heads=args.heads,
            dim_head=head_dim,
            window_size=args.cluster_window,
            local_attn_window_size=args.window,
            causal=True,
            n_local_attn_heads=local_heads,
            ff_mult=args.ff_mult,
            kmeans_ema_decay=0.999,
        )
        model = AutoregressiveWrapper(net).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        info.update(window_size=args.cluster_window, num_clusters=total_len // args.cluster_window, n_local_attn_heads=list(local_heads))
        return model, loss_step(optimizer, lambda seq: model(seq, return_loss=True)), info
    raise ValueError(f"unknown implementation {impl!r}")


def build(mechanism: str, impl: str, args: argparse.Namespace, device: str, total_len: int):
    if impl == "longlm":
        return build_ours(mechanism, args, device, total_len)
    return build_peer(mechanism, impl, args, device, total_len)


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------
def at_length(items: list[str] | None, total_len: int, default: int) -> int:
    """The N of a `LEN=N` item for this length (`--steps-at`, `--warmup-at`), else `default`."""
    for item in items or []:
        length, _, count = item.partition("=")
        if int(length) == total_len:
            return int(count)
    return default


def sequences(args: argparse.Namespace, count: int, total_len: int, device: str):
    return real_byte_tokens(args.data, count * args.batch, total_len + 1, device).view(count, args.batch, total_len + 1)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def others_share(seconds: float, cores: int) -> float:
    """Share of the machine's CPU that other processes used over the next `seconds` (this one sleeps)."""
    b0, c0 = system_busy_seconds(), time.process_time()
    time.sleep(seconds)
    b1, c1 = system_busy_seconds(), time.process_time()
    return 0.0 if b0 is None else max(0.0, (b1 - b0) - (c1 - c0)) / (cores * seconds)


def wait_until_quiet(max_wait: float, cores: int) -> float:
    """Sleep (up to `max_wait` s) until other processes use < CLEAN_OTHERS_FRACTION of the machine for 1 s:
    on a shared machine a step then starts quiet; whether it stayed quiet is still measured. Returns the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait and others_share(1.0, cores) >= CLEAN_OTHERS_FRACTION:
        pass
    return time.perf_counter() - start


def time_interleaved(torch, device: str, runners: dict[str, Step], data, errors: dict[str, str], max_wait: float = 0.0):
    """Run every runner on each sequence of `data`, alternating the order (A B C, C B A, ...), timing each
    step (wall, own CPU, share of the machine other processes took). A runner that raises is dropped and its
    error kept in `errors`."""
    names = list(runners)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    others = {name: [] for name in names}
    losses: dict[str, float] = {}
    cores = available_cores()
    for index in range(len(data)):
        for name in names if index % 2 == 0 else names[::-1]:
            if name in errors:
                continue
            if max_wait > 0:
                wait_until_quiet(max_wait, cores)
            sync(torch, device)
            w0, c0, b0 = time.perf_counter(), time.process_time(), system_busy_seconds()
            try:
                loss = runners[name](data[index])
            except Exception as error:  # noqa: BLE001 - a peer that cannot run this length is a result
                errors[name] = error_text(error)
                continue
            sync(torch, device)
            w1, c1, b1 = time.perf_counter(), time.process_time(), system_busy_seconds()
            wall[name].append(w1 - w0)
            cpu[name].append(c1 - c0)
            others[name].append(max(0.0, (b1 - b0) - (c1 - c0)) / (cores * (w1 - w0)) if b0 is not None else 0.0)
            losses[name] = float(loss)
    return wall, cpu, others, losses


def speed_worker(args: argparse.Namespace, mechanism: str, total_len: int, impls: list[str]) -> dict[str, Any]:
    """The implementations in one process, steps interleaved, so each step sees the same machine load."""
    torch, threads, device = setup_torch(args.threads, args.device)
    warmup = at_length(args.warmup_at, total_len, args.warmup)
    steps = warmup + at_length(args.steps_at, total_len, args.steps)
    data = sequences(args, steps, total_len, device)
    models, runners, infos, errors = {}, {}, {}, {}
    for impl in impls:
        torch.manual_seed(args.seed)
        try:
            models[impl], runners[impl], infos[impl] = build(mechanism, impl, args, device, total_len)
        except Exception as error:  # noqa: BLE001
            errors[impl] = error_text(error)
    wall, cpu, others, losses = time_interleaved(torch, device, runners, data, errors, args.wait_quiet)
    for info in infos.values():
        info.update(info.pop("after", dict)())
    rows = []
    tokens = args.batch * total_len
    for impl in impls:
        if impl in errors or len(wall[impl]) <= warmup:
            rows.append({"impl": impl, "mechanism": mechanism, "total_len": total_len, "error": errors.get(impl, "no timed step")})
            continue
        timed, timed_cpu, timed_others = wall[impl][warmup:], cpu[impl][warmup:], others[impl][warmup:]
        clean = [t for t, o in zip(timed, timed_others) if o < CLEAN_OTHERS_FRACTION]
        rows.append(
            {
                "impl": impl,
                "mechanism": mechanism,
                "total_len": total_len,
                "params": num_params(models[impl]),
                "steps": len(timed),
                "step_s": [round(t, 4) for t in timed],
                "warmup_step_s": [round(t, 4) for t in wall[impl][:warmup]],
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
    ours = wall.get("longlm", [])[warmup:]
    pair_ratios = {impl: [round(t / o, 3) for o, t in zip(ours, wall.get(impl, [])[warmup:])] for impl in impls if impl != "longlm"}
    return {
        "mechanism": mechanism,
        "total_len": total_len,
        "rows": rows,
        "pair_speed_ratios": pair_ratios,
        "loadavg_1m": os.getloadavg()[0],
        "threads": threads,
        "device": device,
    }


def memory_worker(args: argparse.Namespace, mechanism: str, impl: str, total_len: int) -> dict[str, Any]:
    """One implementation alone in a fresh process: peak memory over `--mem-steps` training steps."""
    torch, _, device = setup_torch(args.threads, args.device)
    torch.manual_seed(args.seed)
    data = sequences(args, args.mem_steps, total_len, device)
    try:
        peak, kind, times = measure_peak_memory(torch, device, lambda: build(mechanism, impl, args, device, total_len)[1], data)
    except Exception as error:  # noqa: BLE001
        return {"mechanism": mechanism, "impl": impl, "total_len": total_len, "error": error_text(error)}
    return {"mechanism": mechanism, "impl": impl, "total_len": total_len, "peak_mem_mb": peak, "memory_kind": kind, "step_s": times}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mechanisms", nargs="+", choices=list(MECHANISMS), default=list(MECHANISMS))
    parser.add_argument("--impls", nargs="+", help="run only these implementations (longlm and/or peer names)")
    parser.add_argument("--total-lens", dest="total_lens", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff-mult", dest="ff_mult", type=int, default=4, help="FFN inner size = dim * ff_mult")
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--window", type=int, default=256, help="previous tokens each query sees (longformer, routing local)")
    parser.add_argument("--hf-longformer-window", dest="hf_longformer_window", type=int, help="HF attention_window (default --window)")
    parser.add_argument("--block", type=int, default=64, help="bigbird block size")
    parser.add_argument("--random-blocks", dest="random_blocks", type=int, default=3, help="bigbird random blocks")
    parser.add_argument("--chunk", type=int, default=64, help="reformer LSH chunk (bucket) length; buckets = len / chunk")
    parser.add_argument("--hashes", type=int, default=2, help="reformer hash rounds")
    parser.add_argument("--ff-chunk", dest="ff_chunk", type=int, default=1024, help="reformer feed-forward chunk (tokens)")
    parser.add_argument("--ours-reversible", dest="ours_reversible", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--cluster-window", dest="cluster_window", type=int, default=256, help="routing: tokens per cluster")
    parser.add_argument("--ours-preset", dest="ours_preset", help="stand-in preset for ours (e.g. full), sparsity fields unset")
    parser.add_argument("--data", default=DEFAULT_DATA, help="raw byte file whose train split feeds the steps")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per implementation (speed phase)")
    parser.add_argument("--steps-at", dest="steps_at", action="append", metavar="LEN=N", help="timed steps at one length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation first")
    parser.add_argument("--warmup-at", dest="warmup_at", action="append", metavar="LEN=N", help="untimed steps at one length")
    parser.add_argument("--mem-steps", dest="mem_steps", type=int, default=2, help="steps per memory-phase run")
    parser.add_argument("--skip-memory", dest="skip_memory", action="store_true", help="speed phase only")
    parser.add_argument("--in-process", dest="in_process", action="store_true", help="speed phase in this process (smoke tests)")
    parser.add_argument(
        "--wait-quiet", dest="wait_quiet", type=float, default=0.0,
        help="before each timed step, wait up to this many seconds for other processes to leave the CPU (shared machines)",
    )
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--json", help="also write the final JSON object to this file")
    parser.add_argument(WORKER_FLAG, dest="worker", nargs=4, metavar=("KIND", "MECHANISM", "TOTAL_LEN", "IMPLS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def versions() -> dict[str, str]:
    out = {}
    for name in ["longlm", *PEER_PACKAGES, "einops", "hyper-connections"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def subprocess_json(argv: list[str]) -> dict[str, Any]:
    """run_in_subprocess, with a crash (an error, or the kernel killing it for memory) as a result."""
    try:
        return run_in_subprocess(argv)
    except SystemExit as failed:
        return {"error": str(failed)}


def run_speed(me: str, raw: list[str], args: argparse.Namespace, mechanism: str, total_len: int, impls: list[str]) -> dict[str, Any]:
    """All implementations in one worker; if that worker dies, each one alone, so the others still count."""
    if args.in_process:
        return speed_worker(args, mechanism, total_len, impls)
    run = subprocess_json([me, *raw, WORKER_FLAG, "speed", mechanism, str(total_len), ",".join(impls)])
    if "rows" in run:
        return run
    rows, ratios = [], {}
    for impl in impls:
        alone = subprocess_json([me, *raw, WORKER_FLAG, "speed", mechanism, str(total_len), impl])
        rows += alone.get("rows", [{"impl": impl, "mechanism": mechanism, "total_len": total_len, "error": alone.get("error")}])
    return {"mechanism": mechanism, "total_len": total_len, "rows": rows, "pair_speed_ratios": ratios, "note": "workers run alone"}


def growth_rows(summary: list[dict], lengths: list[int], lo: int = 4096, hi: int = 16384) -> list[dict]:
    """Per implementation: step time and peak memory at `hi` over `lo` (linear growth: time x4, memory <= x4)."""
    if lo not in lengths or hi not in lengths:
        return []
    rows = []
    keyed = {(e["mechanism"], e["impl"], e["total_len"]): e for e in summary}
    for (mechanism, impl, length), low in keyed.items():
        high = keyed.get((mechanism, impl, hi))
        if length != lo or high is None:
            continue
        rows.append(
            {
                "mechanism": mechanism,
                "impl": impl,
                "time_ratio": (hi / high["tokens_per_s"]) / (lo / low["tokens_per_s"]),
                "cpu_time_ratio": (hi / high["tokens_per_cpu_s"]) / (lo / low["tokens_per_cpu_s"]),
                "mem_ratio": high["peak_mem_mb"] / low["peak_mem_mb"],
                "length_ratio": hi / lo,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker:
        kind, mechanism, total_len, impls = args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3].split(",")
        if kind == "speed":
            result = speed_worker(args, mechanism, total_len, impls)
        else:
            result = memory_worker(args, mechanism, kind, total_len)
        print(json.dumps(result), flush=True)
        return
    _, threads, device = setup_torch(args.threads, args.device)
    env = environment(device, threads)
    env.update(versions())
    env["sparse_modules"] = import_sparse_mixers()
    env["ours_reversible_implemented"] = reversible_implemented()
    env["longlm_source_sha1"] = source_digest()
    env["python_executable"] = sys.executable
    env["command"] = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__), *raw])
    me = os.path.abspath(__file__)
    wall0 = time.perf_counter()
    summary, ratios, best, speed_runs, memory_runs, failures = [], [], [], [], [], []
    for mechanism in args.mechanisms:
        impls = [impl for impl in MECHANISMS[mechanism] if not args.impls or impl in args.impls]
        for total_len in args.total_lens:
            run = run_speed(me, raw, args, mechanism, total_len, impls)
            speed_runs.append(run)
            for row in run["rows"]:
                if "error" in row:
                    print(f"# {mechanism:>10} speed {row['impl']:>19} len {total_len:>5}: FAILED {row['error']}", file=sys.stderr, flush=True)
                    continue
                print(
                    f"# {mechanism:>10} speed {row['impl']:>19} len {total_len:>5}: {row['tokens_per_s']:7.0f} tok/s median, "
                    f"{row['tokens_per_s_best']:7.0f} best, {row['tokens_per_s_clean']:7.0f} clean ({row['clean_steps']}), "
                    f"steps {row['step_s']}, others' CPU {row['others_cpu_fraction']}",
                    file=sys.stderr,
                    flush=True,
                )
            mem = {}
            if not args.skip_memory:
                for impl in impls:
                    mem[impl] = row = subprocess_json([me, *raw, WORKER_FLAG, impl, mechanism, str(total_len), impl])
                    row.setdefault("impl", impl)
                    memory_runs.append({**row, "mechanism": mechanism, "total_len": total_len})
                    text = f"FAILED {row['error']}" if "error" in row else f"{row['peak_mem_mb']:.0f} MB"
                    print(f"# {mechanism:>10} memory {impl:>19} len {total_len:>5}: {text}", file=sys.stderr, flush=True)
            by_impl = {}
            for row in run["rows"]:
                impl = row["impl"]
                error = row.get("error") or mem.get(impl, {}).get("error")
                if "error" in row:
                    failures.append({"mechanism": mechanism, "impl": impl, "total_len": total_len, "phase": "speed", "error": row["error"]})
                    continue
                if error:
                    failures.append({"mechanism": mechanism, "impl": impl, "total_len": total_len, "phase": "memory", "error": error})
                peak = mem[impl].get("peak_mem_mb", float("nan")) if mem else float("nan")
                by_impl[impl] = entry = summary_entry(
                    row, total_len, 1, peak, mechanism=mechanism, label=mechanism, tokens_per_cpu_s=row["tokens_per_cpu_s"]
                )
                summary.append(entry)
            ours = by_impl.get("longlm")
            peers = [by_impl[impl] for impl in impls if impl != "longlm" and impl in by_impl]
            if ours is None or not peers:
                continue
            for peer in peers:
                pairs = run["pair_speed_ratios"].get(peer["impl"]) or [float("nan")]
                ratios.append(ratio_row(ours, peer, pairs, mechanism=mechanism, peer=peer["impl"], label=f"{mechanism}: vs {peer['impl']}"))
            fastest = max(peers, key=lambda e: e["tokens_per_s"])
            lowest_mem = min((p["peak_mem_mb"] for p in peers), default=float("nan"))
            speedup = ours["tokens_per_s"] / fastest["tokens_per_s"]
            best.append(
                {
                    "mechanism": mechanism,
                    "total_len": total_len,
                    "best_peer": fastest["impl"],
                    "ours_tok_s": ours["tokens_per_s"],
                    "best_peer_tok_s": fastest["tokens_per_s"],
                    "speedup": speedup,
                    "speedup_cpu_s": ours["tokens_per_cpu_s"] / fastest["tokens_per_cpu_s"],
                    "ours_mem_mb": ours["peak_mem_mb"],
                    "lowest_peer_mem_mb": lowest_mem,
                    "speed_target_met": "yes" if speedup >= SPEED_TARGET else "no",
                    "memory_target_met": "n/a" if math.isnan(ours["peak_mem_mb"] + lowest_mem) else "yes" if ours["peak_mem_mb"] <= lowest_mem else "no",
                }
            )
    growth = growth_rows(summary, args.total_lens)
    print(
        f"device={device} threads={threads} nproc={available_cores()} cpu={env['cpu']} torch={env['torch']} "
        + " ".join(f"{k}={env[k]}" for k in PEER_PACKAGES)
        + f" batch={args.batch} steps={args.steps} warmup={args.warmup} ours_preset={args.ours_preset or 'per mechanism'}"
    )
    print_tables(summary, ratios, device, lead=[("mechanism", "label", "")])
    print()
    print(
        format_table(
            best,
            [
                ("mechanism", "mechanism", ""),
                ("total len", "total_len", "d"),
                ("best peer", "best_peer", ""),
                ("ours tok/s", "ours_tok_s", ".0f"),
                ("best peer tok/s", "best_peer_tok_s", ".0f"),
                ("ours / best peer", "speedup", ".2f"),
                ("(per CPU-s)", "speedup_cpu_s", ".2f"),
                (f">= {SPEED_TARGET}x", "speed_target_met", ""),
                ("ours MB", "ours_mem_mb", ".0f"),
                ("lowest peer MB", "lowest_peer_mem_mb", ".0f"),
                ("MB <= every peer", "memory_target_met", ""),
            ],
        )
    )
    if growth:
        print()
        print(
            format_table(
                growth,
                [
                    ("mechanism", "mechanism", ""),
                    ("impl", "impl", ""),
                    ("step time 16k / 4k (linear 4.0)", "time_ratio", ".2f"),
                    ("step CPU time 16k / 4k", "cpu_time_ratio", ".2f"),
                    ("peak MB 16k / 4k", "mem_ratio", ".2f"),
                ],
            )
        )
    for failure in failures:
        print(f"FAILED {failure['mechanism']} {failure['impl']} len {failure['total_len']} ({failure['phase']}): {failure['error']}")
    print(f"# wall time {time.perf_counter() - wall0:.0f} s", file=sys.stderr)
    result = {
        "benchmark": "compare_sparse_peers",
        "env": env,
        "args": vars(args),
        "summary": summary,
        "ratios": ratios,
        "best_peer": best,
        "growth": growth,
        "failures": failures,
        "speed_runs": speed_runs,
        "memory_runs": memory_runs,
    }
    line = json.dumps(result, default=str).replace("NaN", "null")
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(json.loads(line), indent=1) + "\n")


if __name__ == "__main__":
    main()
