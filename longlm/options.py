"""Mechanism-owned config options: a mixer or memory declares the options it reads, with defaults and rules.

`LongLMConfig` knows no mechanism by name: it collects the `options` of every registered mixer and memory
(`collect_options`), gives each its default, refuses a bad value with one sentence naming the option, and
stores them as attributes (so `config.attention_window` reads as on a Hugging Face Longformer config and
`config.json` keeps its flat keys). A new mechanism adds its options in its own file.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Option:
    """One config option: its default, a validity rule and what the rule expects (for the error)."""

    default: Any
    valid: Callable[[Any], bool]
    expected: str


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML/JSON give `true` where a typo meant a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool (NaN or inf sizes and rates only fail later)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def non_negative_int(value: Any) -> bool:
    return is_int(value) and value >= 0


def positive_int_or_none(value: Any) -> bool:
    return value is None or positive_int(value)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def int_or_int_list(value: Any, ok: Callable[[Any], bool]) -> bool:
    """One value, or a (possibly nested) list of them (per-layer windows, per-layer/per-head dilations)."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(int_or_int_list(item, ok) for item in value)
    return ok(value)


# shorthand for the common rules
POSITIVE = (positive_int, "a positive integer")
NON_NEGATIVE = (non_negative_int, "a non-negative integer")
BOOL = (is_bool, "True or False")


def option(default: Any, rule: tuple[Callable[[Any], bool], str]) -> Option:
    return Option(default, rule[0], rule[1])


def collect_options(classes: Iterable[type]) -> dict[str, Option]:
    """Every option the classes declare (`options` class attribute); an option two classes share (e.g.
    `attention_window`, read by `sliding` and `routing`) must be declared with the same default and rule."""
    found: dict[str, tuple[Option, str]] = {}
    for cls in classes:
        for name, spec in getattr(cls, "options", {}).items():
            if name in found and found[name][0] != spec:
                raise ValueError(
                    f"Config option '{name}' is declared differently by {found[name][1]} and {cls.__name__}; "
                    "expected one default and one rule for an option that two mechanisms share."
                )
            found.setdefault(name, (spec, cls.__name__))
    return {name: spec for name, (spec, _) in found.items()}
