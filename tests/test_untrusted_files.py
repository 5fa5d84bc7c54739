"""Files from someone else: a checkpoint whose pickle would run code, or whose tokenizer file names point
outside the run folder, is refused by export and by resume, and nothing runs or lands outside."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from longlm.training.checkpoint_io import AtomicCheckpointIO
from longlm.training.cli import main as pretrain_main
from longlm.training.export import export_checkpoint
from longlm.training.safe_load import UnsafeCheckpointError, check_checkpoint_folder, load_checkpoint_file
from tests.paths import ENWIK8_SAMPLE, REPO, requires_shared_data

pytestmark = requires_shared_data

TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "mem_len": 8}


class RunsCode:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint would do with a real payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_run_yaml(folder: Path) -> Path:
    config = {
        "seed_everything": 3,
        "model": {"preset": "transformer-xl", "config": TINY},
        "data": {"dataset": "enwik8", "path": str(ENWIK8_SAMPLE), "batch_size": 2, "tgt_len": 16,
                 "eval_batch_size": 2, "eval_tgt_len": 16, "cache_dir": str(folder / "cache")},
        "trainer": {
            "accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(folder),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": "${trainer.default_root_dir}/checkpoints", "save_last": True}}],
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A real 2-step run: its YAML and its last checkpoint (read as longlm reads it)."""
    folder = tmp_path_factory.mktemp("run")
    pretrain_main(["fit", "--config", str(write_run_yaml(folder))])
    checkpoint = load_checkpoint_file(folder / "checkpoints" / "last.ckpt")
    assert checkpoint["longlm"]["tokenizer_files"], "the run should have stored its tokenizer"
    return folder, checkpoint


def resume(folder: Path, checkpoint: Path | str, root: Path, *flags: str) -> None:
    """`pretrain.py fit --config <the run's YAML> --ckpt_path <checkpoint>` into the run folder `root`."""
    pretrain_main(["fit", "--config", str(folder / "run.yaml"), "--ckpt_path", str(checkpoint),
                   "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), *flags])


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def crafted(folder: Path, checkpoint: dict, **longlm_state) -> Path:
    path = folder / f"crafted-{uuid.uuid4().hex[:8]}.ckpt"
    torch.save({**checkpoint, "longlm": {**checkpoint["longlm"], **longlm_state}}, path)
    return path


def test_a_real_checkpoint_loads_with_the_restricted_unpickler(trained):
    folder, checkpoint = trained
    assert checkpoint["global_step"] == 2
    loaded = AtomicCheckpointIO().load_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert loaded["global_step"] == 2
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(folder / "checkpoints" / "last.ckpt", weights_only=False)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_by_export_and_resume(trained, tmp_path):
    folder, checkpoint = trained
    marker = tmp_path / "code-ran"
    evil = crafted(tmp_path, checkpoint, payload=RunsCode(marker))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export.py"), str(evil), str(tmp_path / "exported")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "UnsafeCheckpointError" in last_line and str(evil) in last_line and "posix.system" in last_line
    assert not marker.exists() and not (tmp_path / "exported").exists()

    with pytest.raises(UnsafeCheckpointError, match=r"holds the global 'posix.system'.*could run code") as error:
        resume(folder, evil, tmp_path / "resumed")
    assert "\n" not in str(error.value) and str(evil) in str(error.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["absolute", "parent", "nested"])
def test_tokenizer_file_names_from_a_checkpoint_write_nothing_outside(trained, tmp_path, kind):
    folder, checkpoint = trained
    unique = f"longlm-escape-{uuid.uuid4().hex[:8]}"
    outside = tmp_path / "outside"
    outside.mkdir()
    name = {"absolute": str(outside / unique), "parent": f"../{unique}", "nested": f"{outside.name}/{unique}"}[kind]
    files = {**checkpoint["longlm"]["tokenizer_files"], name: b"written from a checkpoint"}
    evil = crafted(tmp_path, checkpoint, tokenizer_files=files)
    before = {root: files_under(root) for root in (tmp_path, folder)}

    with pytest.raises(ValueError, match=r"Tokenizer file name .* is not allowed; expected a plain file name") as error:
        export_checkpoint(evil, tmp_path / "exported")
    assert "\n" not in str(error.value) and repr(name) in str(error.value)
    with pytest.raises(ValueError, match=r"Tokenizer file name .* is not allowed"):
        resume(folder, evil, tmp_path / "resumed")

    assert not (outside / unique).exists() and not (tmp_path / "exported").exists()
    assert not [p for p in Path(tempfile.gettempdir()).iterdir() if unique in p.name]  # where "../x" would land
    assert {p for p in files_under(tmp_path) - before[tmp_path] if "resumed" not in p.relative_to(tmp_path).parts} == set()
    # the refused resume wrote no checkpoint or log of its own beside the run's
    assert {p for p in files_under(folder) - before[folder] if "cache" not in p.parts} == set()


def _deepspeed_like_folder(root: Path, shard: object, tag: str = "checkpoint") -> Path:
    folder = root / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text(tag)
    torch.save(shard, folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def test_deepspeed_folders_are_read_with_the_restricted_unpickler_first(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    assert deepspeed.__version__
    genuine = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0)}}
    check_checkpoint_folder(_deepspeed_like_folder(tmp_path / "genuine", genuine))  # what DeepSpeed writes loads

    marker = tmp_path / "code-ran"
    evil = _deepspeed_like_folder(tmp_path / "evil", {"optimizer_state_dict": RunsCode(marker)})
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        export_checkpoint(evil, tmp_path / "exported")
    assert not marker.exists() and not (tmp_path / "exported").exists()

    escaping = _deepspeed_like_folder(tmp_path / "escaping", genuine, tag="../../elsewhere")
    with pytest.raises(UnsafeCheckpointError, match=r"'latest' file names '\.\./\.\./elsewhere', expected the name of a folder inside it"):
        check_checkpoint_folder(escaping)


def test_export_refuses_a_checkpoint_whose_weights_do_not_fit_its_hyperparameters(trained, tmp_path):
    _, checkpoint = trained
    weights = dict(checkpoint["state_dict"])
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["model.extra.weight"] = torch.zeros(2)
    edited = tmp_path / "edited.ckpt"
    torch.save({**checkpoint, "state_dict": weights}, edited)
    with pytest.raises(ValueError, match=rf"do not fit the model .*\(missing {dropped}; unexpected model\.extra\.weight\)") as error:
        export_checkpoint(edited, tmp_path / "exported")
    assert "\n" not in str(error.value) and not (tmp_path / "exported").exists()


def test_ckpt_path_file_with_other_model_values_is_refused_like_ckpt_path_last(trained, tmp_path):
    """Lightning's CLI would replace `--model.*` by the file's hyperparameters without a word; longlm keeps
    the flags and refuses the difference with the sentence `--ckpt_path last` gives."""
    folder, _ = trained
    flag = ("--model.config", '{"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, '
            '"intermediate_size": 64, "mem_len": 16}')
    messages = []
    for checkpoint, root in ((folder / "checkpoints" / "last.ckpt", tmp_path / "elsewhere"), ("last", folder)):
        with pytest.raises(ValueError, match=r"trained with mem_len=8 \(now 16\); loading it cannot change the model's configuration") as error:
            resume(folder, checkpoint, root, *flag)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]


def test_a_checkpoint_from_before_a_config_field_existed_still_resumes(trained, tmp_path):
    """A field added to LongLMConfig later (absent from the saved config) counts as its default, so an older
    checkpoint resumes instead of being refused as a different model."""
    folder, checkpoint = trained
    saved = {k: v for k, v in checkpoint["longlm"]["model_config"].items() if k != "use_cache"}
    older = crafted(tmp_path, checkpoint, model_config=saved)
    resume(folder, older, tmp_path / "resumed")
    assert load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 3
