"""Run folders: one run per folder. A lock is held while a run is alive, default names cannot collide, a fresh
run never mixes with an older run's files, and a config edited in the folder after the start is reported.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from flowgrove.config.resume import flat_keys, resumable

LOCK = ".lock"
EVAL_FILE, GRIDS, BEST_FILE, REPORT = "eval.jsonl", "eval_grids", "best.json", "report.html"  # the monitor's
# Everything a run writes into its folder; a fresh run refuses a folder holding any of these, and --overwrite removes
# them (and nothing else).
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "eval_before.json", "samples_before.png",
             "samples_after.png", "reward_curve.png", "summary.json", "tensorboard", "config.edited.yaml", EVAL_FILE,
             GRIDS, BEST_FILE, REPORT)


def default_run_dir(method: str, root: Path = Path("runs")) -> Path:
    """Create and return ``root/<method>-<YYYYmmdd-HHMMSS>-<random hex>``; never a folder that already exists."""
    for _ in range(8):
        path = Path(root) / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a new run folder under {root}; pass --out DIR")


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` holding the owner's PID; the kernel drops it when the owner
    dies (also by SIGKILL), so a lock left by a killed run never blocks the next one: it is taken over, and
    ``stale_owner`` is the PID that file named (None when there was none)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd = _locked_fd(self.path)
        self.stale_owner = os.read(self.fd, 32).decode(errors="replace").strip() or None
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _locked_fd(path: Path) -> int:
    """An fd of ``path`` holding its flock; retried when the owner removed the file while we waited for it."""
    for _ in range(8):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"{path.parent} is in use by another flowgrove run (PID {owner}, lock {path}); "
                                  "wait for it to end or pick another --out") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise FileExistsError(f"could not lock {path}; another process keeps replacing it")


def leftovers(run_dir: Path) -> list[str]:
    """Names of earlier run files in ``run_dir``."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def clear_for_fresh_run(run_dir: Path, overwrite: bool, has_checkpoint: bool) -> list[str]:
    """Make ``run_dir`` ready for a fresh run; returns what ``overwrite`` removed.

    A folder that holds an earlier run is refused unless ``overwrite``, which removes every file a run writes
    (:data:`RUN_FILES`, checkpoints included) and nothing else.
    """
    found = leftovers(run_dir)
    if found and not overwrite and has_checkpoint:
        raise FileExistsError(f"{run_dir} already holds a run with checkpoints; continue it with "
                              f"`flowgrove train --resume {run_dir}`, discard it with --overwrite, or pick another --out")
    if found and not overwrite:
        raise FileExistsError(f"{run_dir} holds a partial run without a checkpoint ({', '.join(found)}); pass "
                              "--overwrite to start afresh there or pick another --out")
    for name in found:
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def partial_writes(run_dir: Path) -> list[Path]:
    """Temporary files of :func:`atomic_write_text` that a kill left in ``run_dir`` (of the files a run writes)."""
    return [p for p in (Path(run_dir) / f"{name}.tmp" for name in RUN_FILES) if p.is_file()]


def changed_keys(saved_yaml: str, edited_yaml: str, ignore: tuple[str, ...] = ("train.steps",)) -> list[str]:
    """Dotted keys whose values differ between two config texts (``ignore`` may change on resume)."""
    a = flat_keys(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    b = flat_keys(OmegaConf.to_container(OmegaConf.create(edited_yaml)))
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k, "<unset>") != b.get(k, "<unset>"))


def reconcile_config(run_dir: Path, checkpoint_yaml: str, resumed_yaml: str) -> str | None:
    """Make ``run_dir/config.yaml`` the config that resumes (``resumed_yaml``: the checkpoint's, with a new
    ``--steps`` and the keys a resume may change, see :mod:`flowgrove.config.resume`). One line to report when the
    file had been edited after the start in other keys; the edit is kept as ``config.edited.yaml``."""
    path = Path(run_dir) / "config.yaml"
    text = path.read_text(errors="replace") if path.is_file() else checkpoint_yaml
    try:
        keys = [key for key in changed_keys(checkpoint_yaml, text) if not resumable(key)]
    except Exception:  # noqa: BLE001  (an edit that is not valid YAML any more)
        keys = ["not valid YAML"]
    if keys:
        (path.parent / "config.edited.yaml").write_text(text)
    atomic_write_text(path, resumed_yaml)
    if not keys:
        return None
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return (f"{path} was edited after the run started ({shown}); the run resumes with its checkpoint's config, "
            "the edit is ignored and kept as config.edited.yaml (start a new run to change settings; a resume "
            "changes only --steps and the keys `flowgrove train --help` lists under --resume)")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a kill leaves the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
