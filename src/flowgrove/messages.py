"""Small text helpers of the one-line error messages (config, CLI, method checks)."""

from __future__ import annotations

import difflib


def did_you_mean(word: str, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""``."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and how to fix it."""
