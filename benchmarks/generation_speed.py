"""Greedy generation speed of every decoder preset after long prompts, next to Hugging Face decoders.

    python benchmarks/generation_speed.py --prompts 1024 4096 16384 --new-tokens 256 \
        --json benchmarks/results/generation-speed-cpu.jsonl --plot benchmarks/results/generation-speed-cpu.png

Every model: 2 layers, d=128, 4 heads of 32, FFN 512, byte vocabulary 259 (ByT5 ids), batch 1, float32,
eval mode. The prompt is real text: the first `prompt` bytes of ../shared/data/enwik8-sample. One cell =
`generate(prompt, max_new_tokens=N + 1, min_new_tokens=N + 1, do_sample=False)` with N = `--new-tokens`; a
logits processor stamps the time of every step, and decode tokens/s = N / (last stamp - first stamp), so the
prompt's own forward (inside the first step) is not counted. Each cell runs `--repeats` times; the median is reported.

Ours: `LongLMConfig.from_preset(<preset>, <size>)`, the preset's own mechanism settings (windows, blocks,
buckets, memory lengths). What a step costs depends on how the preset generates
(`LongLMForCausalLM.prepare_inputs_for_generation`): `full`, `bigbird`, `reformer` and `routing` cache every
earlier key (`longlm/attention/kv_cache.py`), `longformer` a rolling window, the memory presets feed the new
token after their memory (`transformer-xl`, `compressive`, `memorizing`), and `rmt` feeds its whole segment
again at every step (`--refeed-max-prompt` skips its longest prompts).

Peers (same sizes): HF `LlamaForCausalLM` (full attention with HF's `DynamicCache`: the KV-cache baseline of
`full`), HF `MistralForCausalLM` with `sliding_window=256` (a Longformer-style causal window with HF's rolling
cache; HF's Longformer itself has no causal LM), HF `ReformerModelWithLMHead` (LSH, chunk 64, 2 hashes, its
bucket cache) and HF `BigBirdForCausalLM` (as a decoder HF runs BigBird with full attention and a KV cache).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from longlm import LongLMConfig, LongLMForCausalLM  # noqa: E402
from longlm.presets import PRESETS, layer_mixers_at  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "enwik8-sample" / "enwiki_sample.xml"
SIZE = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=259)
REFEEDS = {"rmt"}  # feeds the whole segment again at every step


def ours(preset: str, length: int) -> torch.nn.Module:
    """The preset at the benchmark size; its other mixer (memorizing's knn, routing's routing) in the last layer."""
    per_layer = layer_mixers_at(preset, SIZE["num_hidden_layers"])
    lists = {} if per_layer is None else {"layer_mixers": per_layer}
    config = LongLMConfig.from_preset(preset, **SIZE, **lists, hidden_dropout_prob=0.0, attention_dropout=0.0)
    return LongLMForCausalLM(config)


def hf_llama(length: int, sliding_window: int | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512 * 2 // 3,
        num_hidden_layers=2, vocab_size=259, max_position_embeddings=length + 8, pad_token_id=0,
    )
    if sliding_window is None:
        return LlamaForCausalLM(LlamaConfig(**common))
    return MistralForCausalLM(MistralConfig(**common, sliding_window=sliding_window))


def hf_reformer(length: int) -> torch.nn.Module:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        attn_layers=["lsh", "lsh"], hidden_size=128, num_attention_heads=4, attention_head_size=32,
        feed_forward_size=512, vocab_size=259, is_decoder=True, axial_pos_embds=False,
        max_position_embeddings=length + 8, lsh_attn_chunk_length=64, num_hashes=2, num_buckets=None,
        pad_token_id=0, eos_token_id=None, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
    )
    return ReformerModelWithLMHead(config)


def hf_bigbird(length: int) -> torch.nn.Module:
    from transformers import BigBirdConfig, BigBirdForCausalLM

    config = BigBirdConfig(
        hidden_size=128, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2, vocab_size=259,
        is_decoder=True, attention_type="block_sparse", block_size=64, num_random_blocks=3,
        max_position_embeddings=length + 8, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BigBirdForCausalLM(config)


PEERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "hf-llama (full, KV cache)": hf_llama,
    "hf-mistral (window 256, rolling cache)": lambda length: hf_llama(length, sliding_window=256),
    "hf-reformer": hf_reformer,
    "hf-bigbird (decoder)": hf_bigbird,
}


def prompt_ids(length: int) -> torch.Tensor:
    data = DATA.read_bytes()[:length]
    if len(data) < length:
        raise SystemExit(f"{DATA} holds {len(data)} bytes, fewer than the {length}-byte prompt asked for.")
    return torch.tensor([list(data)], dtype=torch.long) + 3  # ByT5 ids: bytes after pad/eos/unk


class StepClock:
    """A logits processor that only notes the time of every decoding step (HF calls it once per new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def decode_rate(model: torch.nn.Module, prompt: torch.Tensor, new: int, repeats: int) -> float:
    """New tokens per second after the first one (whose step includes the prompt's forward): the steps
    between the first and the last timestamp of `StepClock`."""
    from transformers import LogitsProcessorList

    rates = []
    for _ in range(repeats):
        clock = StepClock()
        with torch.no_grad():
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new + 1, min_new_tokens=new + 1,
                do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
            )
        assert out.shape[1] == prompt.shape[1] + new + 1 and len(clock.times) == new + 1
        rates.append(new / (clock.times[-1] - clock.times[0]))
    return statistics.median(rates)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(row["model"] for row in rows):
        points = sorted((row["prompt"], row["tokens_per_s"]) for row in rows if row["model"] == name)
        style = "-o" if not name.startswith("hf-") else "--s"
        ax.plot([p for p, _ in points], [r for _, r in points], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("greedy decode tokens/s (after the prompt)")
    ax.set_title("Generation speed, 2 layers d=128, batch 1, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS.names()))
    parser.add_argument("--peers", nargs="*", default=list(PEERS), help="peer names (see PEERS); none to skip")
    parser.add_argument("--refeed-max-prompt", type=int, default=4096, help="longest prompt for presets that re-feed")
    parser.add_argument("--peer-max-prompt", type=int, default=16384, help="longest prompt for hf-reformer/hf-bigbird")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.json:
        args.json.write_text("")
    builders = {name: (lambda length, name=name: ours(name, length)) for name in args.presets}
    builders.update({name: PEERS[name] for name in args.peers})
    rows = []
    for name, build in builders.items():
        for length in args.prompts:
            if name in REFEEDS and length > args.refeed_max_prompt:
                continue
            if name.startswith(("hf-reformer", "hf-bigbird")) and length > args.peer_max_prompt:
                continue
            model = build(length + args.new_tokens + 8).eval()
            rate = decode_rate(model, prompt_ids(length), args.new_tokens, args.repeats)
            row = {"benchmark": "generation_speed", "model": name, "prompt": length, "new_tokens": args.new_tokens,
                   "tokens_per_s": round(rate, 2), "threads": args.threads, "date": date.today().isoformat(),
                   "machine": f"{platform.machine()} cpu, torch {torch.__version__}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as sink:
                    sink.write(json.dumps(row) + "\n")
    print("\n| model | " + " | ".join(f"{p} prompt" for p in args.prompts) + " |")
    print("|---|" + "---|" * len(args.prompts))
    for name in builders:
        cells = {row["prompt"]: row["tokens_per_s"] for row in rows if row["model"] == name}
        print(f"| {name} | " + " | ".join(f"{cells[p]:.1f}" if p in cells else "—" for p in args.prompts) + " |")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
