"""Small text helpers of the one-line error messages (config, CLI, method checks), how an error that reaches the
command line reads and whether it is the user's to fix, and how the user runs flowgrove."""

from __future__ import annotations

import difflib
import errno
import os
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
    """``flowgrove: text`` as one line on stderr: what flowgrove chose or changed for the user, and why. Under
    torchrun only the global rank 0 says it (``RANK``, set by the launcher), so N ranks do not print it N times."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"flowgrove: {one_line(text)}", file=sys.stderr)


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and how to fix it."""


class UserFixable(Exception):
    """Mixed into an error the user can fix that is neither a ``ValueError`` nor an ``OSError`` (a reward server to
    start): the command line ends it with exit code 2, as those, rather than 1 (an internal error)."""


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


_DISK_FIXES = {
    errno.ENOSPC: "the disk is full; free space there or write elsewhere with --out PATH",
    errno.EDQUOT: "the disk quota is used up; free space there or write elsewhere with --out PATH",
    errno.EROFS: "the file system is read-only; write elsewhere with --out PATH",
}
_ACCESS_FIXES = {
    errno.EACCES: "permission denied; pick a folder you can write with --out PATH (or fix its permissions)",
    errno.EPERM: "operation not permitted; pick a folder you can write with --out PATH (or fix its permissions)",
}
_DISK_WORDS = ("No space left", "Read-only file system", "Disk quota exceeded", "StorageFull", "file write failed")


MAX_ERROR_CHARS = 2000  # an error that quotes a 1 MB prompt or a whole file is cut in the middle


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text``, or its start and end around a note of how much was left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def error_message(err: Exception) -> str:
    """One line naming what went wrong and how to fix it, for an error that reached the command line."""
    if isinstance(err, ConfigError):
        return f"flowgrove: config error: {_clip(one_line(err))}"
    where = f" {err.filename}" if isinstance(err, OSError) and err.filename else ""
    if isinstance(err, OSError) and err.errno in _DISK_FIXES:
        return f"flowgrove: cannot write{where}: {_DISK_FIXES[err.errno]}"
    if isinstance(err, OSError) and err.errno in _ACCESS_FIXES:
        return f"flowgrove: cannot access{where}: {_ACCESS_FIXES[err.errno]}"
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        return f"flowgrove: error:{where or ' a file'}: {err.strerror}; check the path"
    if isinstance(err, (OSError, ValueError, UserFixable)):  # FileNotFoundError / CheckpointError / ... of ours
        return f"flowgrove: error: {_clip(one_line(err))}"
    if any(word in str(err) for word in _DISK_WORDS):  # torch.save and safetensors wrap the OSError
        return f"flowgrove: cannot write a file ({one_line(err)[:200]}); free disk space or write elsewhere with --out PATH"
    return (f"flowgrove: internal error: {type(err).__name__}: {_clip(one_line(err))} (a bug: rerun with --debug and "
            "report the traceback)")


def user_fixable(err: BaseException) -> bool:
    """Whether an error that reached the command line is the user's to fix (exit 2): a bad value (``ValueError``,
    ``ConfigError``, ``CheckpointError``), a file or disk (``OSError``), a server to start (``UserFixable``), or a
    write that torch or safetensors wrapped around a full disk."""
    return isinstance(err, (ValueError, OSError, UserFixable)) or any(w in str(err) for w in _DISK_WORDS)
