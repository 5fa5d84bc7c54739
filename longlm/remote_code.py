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
import pkgutil
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
_DISCOVERY = "import_mechanisms"  # longlm.registry's package-discovery call
_DISCOVERY_LINE = re.compile(rf"^([ \t]*){_DISCOVERY}\(__name__, __path__\)[ \t]*$", flags=re.MULTILINE)


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


def _discovers_mechanisms(path: Path) -> bool:
    """Whether the file calls `import_mechanisms(...)` (a registry package's `__init__`)."""
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == _DISCOVERY
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
    )


def _discovered_modules(package: str) -> list[str]:
    """The modules `import_mechanisms` imports for `package`: its public submodules, in name order."""
    folder = _module_file(package).parent
    return [f"{package}.{info.name}" for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name)
            if not info.name.startswith("_")]


def model_modules() -> list[str]:
    """Transitive closure of package modules needed by the config and model classes (a registry package
    needs every module it discovers)."""
    seen: set[str] = set()
    todo = list(ENTRY_MODULES)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        todo.extend(_package_imports(path) - seen)
        if _discovers_mechanisms(path):
            todo.extend(set(_discovered_modules(module)) - seen)
    return sorted(seen)


def _write_out_discovery(module: str, text: str) -> str:
    """In a flat copy there is no package to list: the `import_mechanisms(...)` call becomes one relative
    import per discovered module (which Hugging Face's loader follows and copies)."""
    def imports(match: re.Match) -> str:
        indent = match.group(1)
        return "\n".join(
            f"{indent}from .{flat_name(name)} import __name__ as _{flat_name(name)}  # registers its mechanisms"
            for name in _discovered_modules(module)
        )

    return _DISCOVERY_LINE.sub(imports, text)


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
        if _discovers_mechanisms(_module_file(module)):
            text = _write_out_discovery(module, text)
        text = _IMPORT_LINE.sub(lambda m: f"{m.group(1)}from .{flat_name(PACKAGE + '.' + m.group(2))} import", text)
        name = flat_name(module) + ".py"
        (save_directory / name).write_text(text, encoding="utf-8")
        written.append(name)
    return written
