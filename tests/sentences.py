"""Assertions about user-facing error messages: one sentence that names what it must name."""
from __future__ import annotations

import pytest


def assert_one_sentence(message: str, endings: tuple[str, ...] = (".",)) -> None:
    """No line break, ends like a sentence (`endings`), and no second sentence after it."""
    assert "\n" not in message, message
    assert message.endswith(endings), message
    assert not any(f"{end} " in message for end in endings), message


def raises_naming(build, *named: str, error: type[Exception] = ValueError, endings: tuple[str, ...] = (".",)) -> str:
    """The message of the `error` that `build()` raises, checked to be one sentence naming each of `named`."""
    with pytest.raises(error) as info:
        build()
    message = str(info.value)
    for word in named:
        assert word in message, f"{word!r} not named in: {message}"
    assert_one_sentence(message, endings)
    return message
