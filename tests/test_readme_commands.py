"""Every fenced bash command of the README runs as written, in README order, from a copy of the repository.

The copy sits beside a link named `shared` to the real `../shared/data`, so the README's relative data paths
resolve as they do in a fresh clone. Each command gets only small overrides that shorten it (a few training
steps, a few scored segments); commands that cannot run here are skipped by a named rule, and a command no
rule knows fails the test, so a new README command must be classified here. After each command the files
it wrote must be where the README says and git-ignored by the repository's .gitignore.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import yaml

from tests.paths import REPO, SHARED_DATA, requires_shared_data

README = REPO / "README.md"
COPIED = ("README.md", "configs", "scripts", "notebooks")  # what the commands read; longlm is the installed package
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
TIMEOUT_S = 300


def readme_commands(text: str) -> list[list[str]]:
    """The commands of the README's ```bash blocks as argument lists (continuations joined, comments dropped)."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def option(tokens: list[str], name: str) -> str | None:
    """The value after `name` in a command, or None."""
    return tokens[tokens.index(name) + 1] if name in tokens else None


def is_script(tokens: list[str], script: str) -> bool:
    return tokens[:2] == ["python", f"scripts/{script}.py"]


def run_root(tokens: list[str], cwd: Path) -> Path:
    """A fit's `trainer.default_root_dir`: the command line's, else its YAML's (the README: `<default_root_dir>/hf`)."""
    root = option(tokens, "--trainer.default_root_dir")
    if root is None:
        root = yaml.safe_load((cwd / option(tokens, "--config")).read_text())["trainer"]["default_root_dir"]
    return Path(root)


@dataclass
class Plan:
    """How one README command is run here: skipped by a named rule, or run with `extra` flags appended."""

    tokens: list[str]
    skip: str | None = None
    extra: list[str] = field(default_factory=list)
    expect_files: list[str] = field(default_factory=list)
    expect_json: bool = False
    check_only: list[str] = field(default_factory=list)  # paths a server command reads; it is not started


def skip_rule(tokens: list[str], skipped_roots: list[str]) -> str | None:
    """The named rule that keeps a command from running here, or None."""
    if tokens[0] == "pip" or tokens[:3] == ["python", "-m", "pip"]:
        return "install: the set-up command is what made this environment"
    if "pytest" in tokens[:3]:
        return "test suite: this test is part of it"
    devices = option(tokens, "--trainer.devices")
    if tokens[0] == "torchrun" or (devices is not None and devices != "1" and "cpu" not in tokens):
        return "needs GPUs: several GPU devices (and the full data set)"
    if any(token.startswith(root + "/") for token in tokens for root in skipped_roots):
        return "reads the output of a command skipped for needing GPUs"
    return None


def plan(tokens: list[str], cwd: Path, skipped_roots: list[str]) -> Plan:
    """Classify one README command; an unknown command fails, so none is skipped silently."""
    rule = skip_rule(tokens, skipped_roots)
    if rule is not None:
        if "--config" in tokens and rule.startswith("needs GPUs"):
            skipped_roots.append(str(run_root(tokens, cwd)))
        return Plan(tokens, skip=rule)
    if tokens[:3] == ["python", "-m", "longlm.quickstart"]:
        root = option(tokens, "--root-dir") or "runs/quickstart"
        return Plan(tokens, extra=["--max-steps", "20", "--new-tokens", "40"],
                    expect_files=[f"{root}/hf/config.json", f"{root}/loss.png", f"{root}/tensorboard"])
    if (is_script(tokens, "pretrain") or is_script(tokens, "finetune_qa")) and tokens[2] == "fit":
        steps = "4" if "--ckpt_path" in tokens else "2"  # a resume must have steps left after the first run's 2
        extra = ["--trainer.max_steps", steps]
        if is_script(tokens, "finetune_qa"):
            # 8 examples are 4 batches: validate after step 2 instead of the YAML's 400
            extra += ["--data.max_train_examples", "8", "--data.max_eval_examples", "4", "--trainer.val_check_interval", "2"]
        root = run_root(tokens, cwd)
        return Plan(tokens, extra=extra, expect_files=[f"{root}/hf/config.json", f"{root}/checkpoints/last.ckpt"])
    if is_script(tokens, "export"):
        return Plan(tokens, expect_files=[f"{tokens[3]}/config.json", f"{tokens[3]}/model.safetensors"])
    if is_script(tokens, "evaluate"):
        return Plan(tokens, extra=["--max-segments", "4"], expect_json=True)
    if is_script(tokens, "evaluate_qa"):
        output_dir = option(tokens, "--output-dir")
        return Plan(tokens, extra=["--max-examples", "4"], expect_json=True,
                    expect_files=[f"{output_dir}/predictions.json"] if output_dir else [])
    if tokens[:2] == ["jupyter", "nbconvert"] and "--execute" in tokens:
        notebook = Path(next(t for t in tokens if t.endswith(".ipynb")))
        return Plan(tokens, expect_files=[f"{option(tokens, '--output-dir') or notebook.parent}/{notebook.name}"])
    if tokens[0] == "tensorboard":
        return Plan(tokens, skip="server: not started, its --logdir is checked", check_only=[option(tokens, "--logdir")])
    if tokens[:2] == ["jupyter", "lab"]:
        return Plan(tokens, skip="server: not started, its notebook is checked", check_only=tokens[2:])
    raise AssertionError(f"No rule in tests/test_readme_commands.py for the README command: {shlex.join(tokens)}")


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def not_ignored(paths: set[str]) -> set[str]:
    """The paths (relative to the repository) that the repository's .gitignore does not ignore."""
    if not paths:
        return set()
    result = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"],
                            input="\n".join(sorted(paths)), capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return paths - set(result.stdout.splitlines())


class Workspace:
    """A copy of the repository beside `shared/`, and the environment of a new user's shell in it."""

    def __init__(self, root: Path) -> None:
        self.repo = root / "longlm"
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, self.repo / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                self.repo.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, self.repo / name)
        (root / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
        (root / "home").mkdir()
        self.env = {**os.environ, "HOME": str(root / "home"), "LONGLM_CACHE": str(root / "cache"),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.skipped_roots: list[str] = []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("clone"))


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_the_commands_this_test_expects():
    names = [shlex.join(tokens[:3]) for tokens in COMMANDS]
    assert "python -m longlm.quickstart" in names
    assert any(name.startswith("jupyter nbconvert") for name in names)
    assert any(tokens[0] == "tensorboard" for tokens in COMMANDS)


@requires_shared_data
@pytest.mark.parametrize("tokens", COMMANDS, ids=[shlex.join(t)[:70] for t in COMMANDS])
def test_readme_command_runs_as_written(tokens, workspace):
    step = plan(tokens, workspace.repo, workspace.skipped_roots)
    for path in step.check_only:
        assert (workspace.repo / path).exists(), f"'{shlex.join(tokens)}' reads {path}, which no earlier command wrote"
    if step.skip is not None:
        pytest.skip(f"rule '{step.skip}'")
    before = files_under(workspace.repo)
    command = shlex.join(tokens + step.extra)
    result = subprocess.run(command, shell=True, cwd=workspace.repo, env=workspace.env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    for path in step.expect_files:
        assert (workspace.repo / path).exists(), f"'{command}' did not write {path}"
    if step.expect_json:
        assert isinstance(json.loads(result.stdout.strip().splitlines()[-1]), dict)
    written = files_under(workspace.repo) - before
    assert not not_ignored(written), f"'{command}' wrote files that git does not ignore: {sorted(not_ignored(written))[:5]}"
    if tokens[:2] == ["jupyter", "nbconvert"]:
        executed = nbformat.read(workspace.repo / step.expect_files[0], as_version=4)
        assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
