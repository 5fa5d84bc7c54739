"""Scaling out: each rank owns its streams; 2-process DDP and DeepSpeed ZeRO-2/3 on CPU (gloo) train exactly
like one process on the same global batch; ZeRO-3 checkpoints export to HF folders; bad DeepSpeed configs
are refused with one sentence each."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from longlm.training import CausalLMPretraining, LMDataModule
from longlm.training.strategies import fill_auto, load_deepspeed_config
from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data

DEEPSPEED_CONFIGS = REPO / "configs" / "deepspeed"
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, mem_len=16, hidden_dropout_prob=0.0)
GLOBAL_BATCH, SEG_LEN, STEPS = 4, 16, 6

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


# --- running scripts/pretrain.py as a user does ---------------------------------------------------------
def write_config(path: Path, *, devices: int = 1, strategy=None, max_steps: int = STEPS, every: int = 2, export: bool = False,
                 model_config: dict | None = None, cache_dir: Path) -> Path:
    """A tiny run's YAML; the batch is split evenly over `devices` ranks, logged every step to CSV."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "run/checkpoints", "save_last": True, "every_n_train_steps": every, "save_top_k": -1}}]
    if export:
        callbacks.append({"class_path": "longlm.training.ExportHuggingFace"})
    config = {
        "seed_everything": 7,
        "model": {"preset": "transformer-xl", "config": model_config or TINY, "learning_rate": 3e-3, "warmup_steps": 2},
        "data": {"dataset": "enwik8", "path": str(ENWIK8_SAMPLE), "batch_size": GLOBAL_BATCH // devices, "tgt_len": SEG_LEN,
                 "eval_batch_size": 2, "eval_tgt_len": SEG_LEN, "cache_dir": str(cache_dir)},
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": strategy or "auto", "max_steps": max_steps,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "gradient_clip_val": 0.25, "log_every_n_steps": 1,
            "enable_model_summary": False, "enable_progress_bar": False, "default_root_dir": "run",
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "run", "name": "logs"}},
            "callbacks": callbacks,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_script(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def pretrain(cwd: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_script([str(REPO / "scripts" / "pretrain.py"), "fit", "--config", "run.yaml", *overrides], cwd, check)


def logged_losses(cwd: Path, version: int = -1) -> dict[int, float]:
    """step -> train_loss from the CSV log of the run's `version` (the latest by default)."""
    versions = sorted((cwd / "run" / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[version] / "metrics.csv") as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row.get("train_loss")}


def deepspeed_strategy(name: str) -> dict:
    return {"class_path": "longlm.training.strategies.DeepSpeedZeRO", "init_args": {"config": str(DEEPSPEED_CONFIGS / f"{name}.json")}}


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> dict[int, float]:
    """The reference: one process, all GLOBAL_BATCH streams."""
    cwd = tmp_path_factory.mktemp("single")
    write_config(cwd / "run.yaml", cache_dir=cwd / "cache")
    pretrain(cwd)
    return logged_losses(cwd)


def assert_same_losses(losses: dict[int, float], reference: dict[int, float], steps) -> None:
    assert sorted(losses) == list(steps)
    assert [losses[s] for s in steps] == pytest.approx([reference[s] for s in steps], abs=1e-4)


# --- streams across ranks -------------------------------------------------------------------------------
@requires_shared_data
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_training_token_is_seen_once_per_epoch_across_ranks(tmp_path, world_size):
    batch_size, seg_len = 3, 512
    seen = None
    for rank in range(world_size):
        data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=batch_size, tgt_len=seg_len, cache_dir=str(tmp_path))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, lightning_module=None)
        data.setup("fit")
        tokens = np.asarray(data.train_split.tokens)
        if seen is None:
            seen = np.zeros(len(tokens), dtype=np.int64)
        stream_len = len(tokens) // (world_size * batch_size)
        segments = 0
        for batch in data.train_dataloader():
            assert batch["segment"] == segments  # in order, none skipped
            for row in range(batch_size):
                begin = (rank * batch_size + row) * stream_len + segments * seg_len
                np.testing.assert_array_equal(batch["input_ids"][row].numpy(), tokens[begin:begin + seg_len])
                seen[begin:begin + seg_len] += 1
            segments += 1
        assert segments == (stream_len - 1) // seg_len  # every rank takes the same number of steps
    assert seen.max() == 1
    # unseen: each stream's tail that fills no whole segment (its last token is still a target), and the
    # split's last len % (world_size * batch_size) tokens, which fill no stream
    streams = world_size * batch_size
    tail = stream_len - segments * seg_len
    assert 1 <= tail <= seg_len
    expected_unseen = streams * tail + len(tokens) % streams
    assert int((seen == 0).sum()) == expected_unseen
    for stream in range(streams):
        end = (stream + 1) * stream_len
        assert not seen[end - tail:end].any() and seen[end - tail - 1] == 1


def test_resuming_on_a_different_number_of_ranks_is_refused():
    module = CausalLMPretraining("transformer-xl", config=TINY, vocab_size=259)
    rank_state = {"train_memory": None, "torch_rng_state": torch.get_rng_state(), "cuda_rng_states": []}
    checkpoint = {"longlm": {"model_config": module.model.config.to_dict(), "next_train_segment": 4, "ranks": [rank_state] * 2}}
    module._trainer = SimpleNamespace(global_rank=0, world_size=1)
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1; .* same number of devices"):
        module.on_load_checkpoint(checkpoint)


@requires_shared_data
def test_gradient_checkpointing_switch_recomputes_without_changing_the_losses(tmp_path):
    import lightning as L

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"]))

    runs = {}
    for switch in (False, True):
        L.seed_everything(7)
        data = LMDataModule("enwik8", str(ENWIK8_SAMPLE), batch_size=2, tgt_len=SEG_LEN, cache_dir=str(tmp_path))
        module = CausalLMPretraining("transformer-xl", config=TINY, vocab_size=data.vocab_size, gradient_checkpointing=switch)
        assert module.model.is_gradient_checkpointing == switch
        losses = Losses()
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[losses], default_root_dir=tmp_path)
        trainer.fit(module, datamodule=data)
        runs[switch] = losses.values
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


# --- 2 CPU processes ------------------------------------------------------------------------------------
@requires_shared_data
def test_ddp_two_processes_train_and_resume_like_one(tmp_path, single_process_losses):
    write_config(tmp_path / "run.yaml", devices=2, strategy="ddp", cache_dir=tmp_path / "cache")
    pretrain(tmp_path)
    assert_same_losses(logged_losses(tmp_path), single_process_losses, range(STEPS))
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=True)["longlm"]
    memories = [rank["train_memory"]["hidden"][0] for rank in state["ranks"]]
    assert len(memories) == 2 and not torch.equal(*memories)  # each rank carried its own streams' memory
    # resume both ranks from step 4: each takes back its own memory and the same next steps follow
    pretrain(tmp_path, "--ckpt_path", "run/checkpoints/epoch=0-step=4.ckpt")
    assert_same_losses(logged_losses(tmp_path), single_process_losses, range(4, STEPS))


@requires_shared_data
@needs_deepspeed
def test_deepspeed_zero2_two_cpu_processes_train_like_one(tmp_path, single_process_losses):
    write_config(tmp_path / "run.yaml", devices=2, strategy=deepspeed_strategy("zero2"), cache_dir=tmp_path / "cache")
    pretrain(tmp_path)
    assert_same_losses(logged_losses(tmp_path), single_process_losses, range(STEPS))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt" / "checkpoint").is_dir()  # DeepSpeed's own format


@requires_shared_data
@needs_deepspeed
def test_deepspeed_zero3_trains_like_one_and_its_checkpoint_exports_the_live_model(tmp_path, single_process_losses):
    write_config(tmp_path / "run.yaml", devices=2, strategy=deepspeed_strategy("zero3"), export=True,
                 cache_dir=tmp_path / "cache")
    pretrain(tmp_path)
    assert_same_losses(logged_losses(tmp_path), single_process_losses, range(STEPS))
    shards = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "last.ckpt" / "checkpoint").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    # sharded checkpoint -> zero_to_fp32 -> HF folder, compared with the live model (gathered at fit end)
    run_script([str(REPO / "scripts" / "export.py"), "run/checkpoints/last.ckpt", "exported", "--fp32-checkpoint", "fp32.ckpt"], tmp_path)
    assert (tmp_path / "fp32.ckpt").is_file()
    from transformers import AutoModelForCausalLM

    live = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([list(b"The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        live_logits, exported_logits = live(ids).logits, exported(ids).logits
    assert torch.equal(live_logits, exported_logits)
    assert live_logits.abs().sum() > 0  # real weights, not ZeRO-3's empty placeholders


def _cpu_adam_is_built() -> bool:
    """Offload trains with DeepSpeedCPUAdam, a C++ op compiled on first use (minutes on 2 cores): the offload
    run is tested where it is built (once: `python -c "from deepspeed.ops.op_builder import CPUAdamBuilder;
    CPUAdamBuilder().load()"`, cached under ~/.cache/torch_extensions)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    return bool(installed_ops.get("cpu_adam")) or (Path(_get_build_directory("cpu_adam", False)) / "cpu_adam.so").exists()


@requires_shared_data
@needs_deepspeed
def test_deepspeed_zero3_offload_two_cpu_processes_train_like_one(tmp_path, single_process_losses):
    if not _cpu_adam_is_built():
        pytest.skip("DeepSpeedCPUAdam is not compiled here (see _cpu_adam_is_built for the one-line build)")
    write_config(tmp_path / "run.yaml", devices=2, strategy=deepspeed_strategy("zero3-offload"), cache_dir=tmp_path / "cache")
    pretrain(tmp_path)
    assert_same_losses(logged_losses(tmp_path), single_process_losses, range(STEPS))


# --- DeepSpeed configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zero1", "zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_every_shipped_deepspeed_config_loads_and_fills_its_autos(name):
    config = load_deepspeed_config(DEEPSPEED_CONFIGS / f"{name}.json")
    values = {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16, "gradient_clipping": 0.25, "fp16.enabled": False,
              "bf16.enabled": True, "zero_optimization.reduce_bucket_size": 4096, "zero_optimization.allgather_bucket_size": 4096,
              "zero_optimization.stage3_prefetch_bucket_size": 3686, "zero_optimization.stage3_param_persistence_threshold": 640}
    filled = fill_auto(config, values, name)
    assert "auto" not in json.dumps(filled) and "gradient_accumulation_steps" not in filled
    assert filled["bf16"]["enabled"] is True and filled["train_micro_batch_size_per_gpu"] == 8
    assert filled["zero_optimization"]["stage"] == int(name[4])
    assert ("offload_optimizer" in filled["zero_optimization"]) == name.endswith("offload")


def test_an_auto_longlm_cannot_fill_is_named():
    with pytest.raises(ValueError, match=r"zero_optimization.sub_group_size is \"auto\", which longlm cannot fill"):
        fill_auto({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, {}, "x.json")


@pytest.mark.parametrize(
    "text, message",
    [
        (None, r"DeepSpeed config '.*missing.json' does not exist; expected a JSON file such as configs/deepspeed/zero2.json\.$"),
        ('{"zero_optimization": {"stage": 2,}}', r"DeepSpeed config '.*' is not valid JSON \(.* at line 1, column \d+\)\.$"),
        ('{"zero_optimization": {"stage": 4}}', r"zero_optimization.stage must be 1, 2 or 3, got 4\.$"),
        ('{"train_batch_size": 8}', r"zero_optimization.stage must be 1, 2 or 3, got None\.$"),
        ('{"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}',
         r"zero_optimization.offload_optimizer needs ZeRO stage 2 or 3, got stage 1\.$"),
        ('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}',
         r"zero_optimization.offload_param needs ZeRO stage 3, got stage 2\.$"),
        ('{"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}',
         r"gradient_accumulation_steps must be \"auto\" \(set trainer.accumulate_grad_batches instead\), got 4\.$"),
    ],
)
def test_bad_deepspeed_config_is_refused_with_one_sentence(tmp_path, text, message):
    from longlm.training.strategies import DeepSpeedZeRO

    path = tmp_path / "missing.json"
    if text is not None:
        path = tmp_path / "bad.json"
        path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        DeepSpeedZeRO(config=str(path))
    assert str(error.value).count(". ") == 0  # one sentence


@requires_shared_data
def test_cli_reports_a_bad_deepspeed_config_in_one_line(tmp_path):
    write_config(tmp_path / "run.yaml", devices=2, strategy=deepspeed_strategy("zero2"), cache_dir=tmp_path / "cache")
    bad = tmp_path / "zero9.json"
    bad.write_text('{"zero_optimization": {"stage": 9}}')
    result = pretrain(tmp_path, "--trainer.strategy.config", str(bad), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"ValueError: DeepSpeed config '{bad}': zero_optimization.stage must be 1, 2 or 3, got 9."
    )
