"""What the suites' recipe dataclasses share: positive-integer checks and building one from a jsonargparse parser."""
from __future__ import annotations

from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def require_positive_ints(recipe: Any, names: Iterable[str]) -> None:
    """ValueError naming the first field of `recipe` that is not a positive integer (bools refused)."""
    for name in names:
        value = getattr(recipe, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(recipe).__name__}.{name} must be a positive integer, got {value!r}.")


def parsed_dataclass(parser, cls: type[T], args: list[str]) -> tuple[Any, T]:
    """(namespace, `cls` instance) from a parser built with `add_class_arguments(cls, None)`."""
    config = parser.parse_args(args)
    init = parser.instantiate(config)
    return config, cls(**{name: getattr(init, name) for name in cls.__dataclass_fields__})
