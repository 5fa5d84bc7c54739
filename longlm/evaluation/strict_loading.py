"""Loading a model folder in longlm's scripts: the weights must fit the config, or nothing is computed.

`from_pretrained` keeps Hugging Face's default for library users (a warning table, the missing weights
initialised at random). A script that then prints a bits-per-character or an F1 would report a number from
random weights, so the scripts load through `load_exactly`, which refuses with one sentence naming what is
missing, unexpected or of the wrong shape. Only weights a task adds on purpose (`may_start_fresh`, e.g. the
span head when a pretrained LM is loaded for question answering) may be absent, and only another task's
head (`may_leave_behind`, the LM head of that pretrained LM) may be left unused.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SHOWN = 4  # keys named per kind in the sentence; the rest are counted


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report table: a mismatch becomes our one sentence instead."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def _mismatch(entry: Any) -> str:
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, in_file, in_model = entry
        return f"{key} ({tuple(in_file)} in the file, {tuple(in_model)} for config.json)"
    return str(entry)


def describe_misfit(
    info: dict[str, Any], may_start_fresh: tuple[str, ...] = (), may_leave_behind: tuple[str, ...] = ()
) -> list[str]:
    """The parts of a loading report that mean the weights do not fit the config (empty when they do)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(may_start_fresh))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(may_leave_behind))
    mismatched = sorted(_mismatch(entry) for entry in info.get("mismatched_keys", ()))
    parts = []
    if missing:
        parts.append(f"missing {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected {_listed(unexpected)}")
    if mismatched:
        parts.append(f"wrong shape {_listed(mismatched)}")
    parts += [str(message).replace("\n", " ") for message in info.get("error_msgs", ())]
    return parts


def load_exactly(
    auto_class: Any, path: str | Path, may_start_fresh: tuple[str, ...] = (), may_leave_behind: tuple[str, ...] = (), **kwargs: Any
):
    """`auto_class.from_pretrained(path)`, refused unless every weight of the model is in the folder with its
    shape and every weight in the folder is used (`may_leave_behind`: prefixes of another task's head)."""
    with _quiet_transformers():
        model, info = auto_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    misfit = describe_misfit(info, may_start_fresh, may_leave_behind)
    if misfit:
        raise ValueError(
            f"The weights in '{path}' do not fit its config.json ({'; '.join(misfit)}); expected the model.safetensors "
            "saved together with that config."
        )
    return model


def misfit_from_torch_error(message: str) -> dict[str, Any]:
    """The loading report inside `nn.Module.load_state_dict(strict=True)`'s error text (Lightning's loads)."""
    def keys(kind: str) -> list[str]:
        found = re.search(rf"{kind} key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)", message)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
        r"the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        message,
    )
    return {
        "missing_keys": keys("Missing"),
        "unexpected_keys": keys("Unexpected"),
        "mismatched_keys": [(key, json.loads(a), json.loads(b)) for key, a, b in shapes],
    }
