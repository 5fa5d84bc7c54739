"""Make a saved folder loadable with `trust_remote_code=True` where longlm is not installed.

Hugging Face's dynamic-module loader copies the module named in `config.json`'s `auto_map` plus the
modules it imports *relatively from the same folder*. Our package has sub-packages and absolute imports,
so at save time we write a flat copy of the modules the model needs (found by walking their imports):
`longlm/attention/full.py` becomes `attention_full.py`, and `from longlm.attention.full import X`
becomes `from .attention_full import X`. Training and data code is never reached, so never copied.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from pathlib import Path

PACKAGE = "longlm"
ENTRY_MODULES = ("longlm.configuration_longlm", "longlm.modeling_longlm")
AUTO_MAP = {
    "AutoConfig": "configuration_longlm.LongLMConfig",
    "AutoModel": "modeling_longlm.LongLMModel",
    "AutoModelForCausalLM": "modeling_longlm.LongLMForCausalLM",
    "AutoModelForMaskedLM": "modeling_longlm.LongLMForMaskedLM",
    "AutoModelForQuestionAnswering": "modeling_longlm.LongLMForQuestionAnswering",
}
_IMPORT_LINE = re.compile(rf"^(\s*)from {PACKAGE}\.([\w.]+) import", flags=re.MULTILINE)


def flat_name(module: str) -> str:
    """`longlm.attention.full` -> `attention_full` (a package's __init__ keeps its own name)."""
    return module[len(PACKAGE) + 1 :].replace(".", "_")


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"Cannot locate module '{module}' to copy into the saved folder.")
    return Path(spec.origin)


def _package_imports(path: Path) -> set[str]:
    """Modules of this package imported anywhere in the file (function bodies and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{path} uses 'import {PACKAGE}...'; model code must use 'from {PACKAGE}.x import y'.")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:
                raise ValueError(f"{path} imports from the top-level '{PACKAGE}' package, which model code must not.")
            if node.module.startswith(PACKAGE + "."):
                found.add(node.module)
    return found


def model_modules() -> list[str]:
    """Transitive closure of package modules needed by the config and model classes."""
    seen: set[str] = set()
    todo = list(ENTRY_MODULES)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_package_imports(_module_file(module)) - seen)
    return sorted(seen)


def write_remote_code(save_directory: str | Path) -> list[str]:
    """Write the flat module copies next to config.json; returns the file names written."""
    save_directory = Path(save_directory)
    if __name__ != f"{PACKAGE}.remote_code":
        # Already running from a flat copy (loaded with trust_remote_code): copy the siblings as they are.
        written = []
        for source in Path(__file__).parent.glob("*.py"):
            if source.name != "__init__.py":
                shutil.copyfile(source, save_directory / source.name)
                written.append(source.name)
        return written
    written = []
    for module in model_modules():
        text = _module_file(module).read_text(encoding="utf-8")
        text = _IMPORT_LINE.sub(lambda m: f"{m.group(1)}from .{flat_name(PACKAGE + '.' + m.group(2))} import", text)
        name = flat_name(module) + ".py"
        (save_directory / name).write_text(text, encoding="utf-8")
        written.append(name)
    return written
