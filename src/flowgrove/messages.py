"""Small text helpers of the one-line error messages (config, CLI, method checks), and how the user runs flowgrove."""

from __future__ import annotations

import difflib
import shutil
import sys
from pathlib import Path


def did_you_mean(word: str, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""``."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def note(text: object) -> None:
    """``flowgrove: text`` as one line on stderr: what flowgrove chose or changed for the user, and why."""
    print(f"flowgrove: {one_line(text)}", file=sys.stderr)


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and how to fix it."""


def program() -> str:
    """How this user runs flowgrove: ``flowgrove`` when it is on PATH, else the script's path (``.venv/bin/flowgrove``
    after ``make``) or ``python -m flowgrove`` with the interpreter's path."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if script.name == "flowgrove":
        found = shutil.which("flowgrove")
        return "flowgrove" if found and Path(found).resolve() == script.resolve() else _short_path(script)
    python = shutil.which("python")
    same = python is not None and Path(python).resolve() == Path(sys.executable).resolve()
    return f"{'python' if same else _short_path(Path(sys.executable))} -m flowgrove"


def _short_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
