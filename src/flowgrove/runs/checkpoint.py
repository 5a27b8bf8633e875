"""Checkpoints: the trainable weights, AdamW state, EMA and KL reference as one sharded
``torch.distributed.checkpoint`` folder (``dcp/``, see :mod:`flowgrove.runs.sharded`), the global RNG
(safetensors), the iteration and the resolved config.

A checkpoint is the folder ``checkpoints/step_NNNNNN``. Every rank writes its shard of ``dcp/`` into a
temporary folder (rank 0 the DCP ``.metadata`` once all shards are written) and hashes the shards it wrote;
then rank 0 writes the RNG and the config, and last ``state.json`` with the sha256 of every other file (every
shard and the metadata included), and renames the folder into place. So a checkpoint is complete exactly when
it has that name, its checksums verify and every file the DCP metadata names is among them (``state.json`` seals
itself too, see :mod:`flowgrove.runs.state`). A write that fails (a full disk) removes what it left and raises
:class:`CheckpointWriteError`.
``checkpoints/latest`` is only a hint: resume takes the newest intact checkpoint and says so when that is not
the one ``latest`` names. A step already on disk is never written again, and a folder is only removed once a
newer intact one is in place. The saving functions are collective under torchrun: every rank calls them (rank
0's run folder is used; other ranks may pass None).

DCP reshards on load: a checkpoint written by N ranks resumes on M ranks, and ``flowgrove export`` and
``flowgrove sample --run`` read it in one process without a process group.

Every sampling generator is derived from (seed, iteration, stream, rank) (``trainer.step_generator``), so the
iteration number restores them exactly; the global torch RNG (rank 0's) is saved as well for anything else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from safetensors.torch import load_file, save_file

from flowgrove.messages import one_line
from flowgrove.parallel import distributed
from flowgrove.runs import sharded
from flowgrove.runs.rundir import atomic_write_text, partial_writes
from flowgrove.runs.state import (PICK, STATE, STEP_NAME, CheckpointError, CheckpointState,  # noqa: F401 (re-exported)
                                  CheckpointWriteError, read_state, state_checksum, write_state)
from flowgrove.training.parts import TrainingState

T = TypeVar("T")
LATEST = "latest"
SHARDS = "dcp"  # the DCP folder of a checkpoint
REQUIRED = (f"{SHARDS}/{sharded.METADATA}", "rng.safetensors", "config.yaml")


@dataclass(frozen=True)
class Choice:
    """The checkpoint a resume starts from, and one line per reason it is not simply ``latest``."""

    path: Path
    state: CheckpointState
    notes: tuple[str, ...]


def checkpoint_name(iteration: int) -> str:
    return f"step_{iteration:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(folder: Path, name: str, writer: Callable[[Path], None]) -> None:
    """Write one file (or the DCP folder) of a checkpoint with ``writer``."""
    writer(folder / name)


def _digests(folder: Path, known: dict[str, str]) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder`` (those in ``known`` already hashed)."""
    names = [f.relative_to(folder).as_posix() for f in sorted(folder.rglob("*")) if f.is_file()]
    return {name: known.get(name) or _sha256(folder / name) for name in names}


def _shard_digests(folder: Path) -> dict[str, str]:
    """sha256 of every shard, each rank hashing those it wrote (``__RANK_*.distcp``) at the same time."""
    _, rank = distributed.world_size_and_rank()
    own = {f"{SHARDS}/{f.name}": _sha256(f) for f in sorted((folder / SHARDS).glob(f"__{rank}_*.distcp"))}
    return {name: digest for part in distributed.all_gather_objects(own) for name, digest in part.items()}


def _on_main(action: Callable[[], T]) -> T | None:
    """``action()`` on rank 0; when it fails, every rank raises (none is left waiting in the next collective)."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = action()
        except Exception as err:  # noqa: BLE001  (re-raised below, once every rank knows)
            error = err
    if distributed.any_rank(error is not None):
        raise error or CheckpointError("rank 0 could not write the checkpoint (see its message)")
    return result


def _fresh_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _finish_folder(training: TrainingState, folder: Path, config_yaml: str, wall_seconds: float,
                   shards: dict[str, str]) -> None:
    """Rank 0's files of a checkpoint whose shards (hashed: ``shards``) are in place; ``state.json`` with the
    checksums of every file comes last."""
    _write(folder, "rng.safetensors", lambda p: save_file({"torch_rng": torch.get_rng_state()}, str(p)))
    _write(folder, "config.yaml", lambda p: p.write_text(config_yaml))
    world, _ = distributed.world_size_and_rank()
    state = CheckpointState(training.iteration, world, round(wall_seconds, 3), _digests(folder, shards),
                            training.counters)
    write_state(folder, asdict(state))


def _temporary(final: Path) -> Path:
    """The folder a checkpoint is written into before it is renamed to ``final``."""
    return final.with_name(f".{final.name}.tmp")


@contextmanager
def _writing(final: Path) -> Iterator[None]:
    """Turn a failed write of checkpoint ``final`` (on any rank: each raises) into :class:`CheckpointWriteError`,
    once rank 0 removed what it left: the temporary folder and a half-written ``latest``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  (OSError, and the errors safetensors and DCP wrap it in)
        if distributed.is_main():
            shutil.rmtree(_temporary(final), ignore_errors=True)
            (final.parent / f"{LATEST}.tmp").unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)[:200]
        raise CheckpointWriteError(f"cannot write checkpoint {final} ({reason}); its partial files were removed and "
                                   "the checkpoints written before are intact") from err


def _write_checkpoint(training: TrainingState, final: Path, config_yaml: str, wall_seconds: float) -> None:
    """Every rank's shard, then rank 0's files, into a temporary folder renamed to ``final`` once complete."""
    tmp = _temporary(final)
    _on_main(lambda: _fresh_folder(tmp))
    _write(tmp, SHARDS, lambda p: sharded.save(training, p))  # collective: returns once the metadata is written
    shards = _shard_digests(tmp)
    _on_main(lambda: (_finish_folder(training, tmp, config_yaml, wall_seconds, shards), _install(tmp, final)))


def _shared_root(run_dir: Path | None) -> Path:
    """Rank 0's ``run_dir/checkpoints`` on every rank."""
    root = Path(distributed.from_main(run_dir)) / "checkpoints"
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
    return root


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; a damaged ``final`` is moved aside first, removed only after."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f".{final.name}.damaged")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(training: TrainingState, run_dir: Path | None, config_yaml: str, keep: int = 2,
                    wall_seconds: float = 0.0) -> Path:
    """Write ``run_dir/checkpoints/step_NNNNNN`` and point ``checkpoints/latest`` at it (every rank calls it).

    An intact checkpoint of the same step is kept as it is (a step is never saved twice). Of the other
    complete checkpoints the newest ``keep`` stay.
    """
    root = _shared_root(run_dir)
    final = root / checkpoint_name(training.iteration)
    with _writing(final):
        if distributed.any_rank(distributed.is_main() and not (final.is_dir() and _intact(final))):
            _write_checkpoint(training, final, config_yaml, wall_seconds)
        _on_main(lambda: (atomic_write_text(root / LATEST, final.name), _prune(root, keep, final)))
    return final


def save_named_checkpoint(training: TrainingState, run_dir: Path | None, name: str, config_yaml: str,
                          wall_seconds: float = 0.0) -> Path:
    """Write (or replace) the checkpoint ``checkpoints/<name>`` (e.g. ``best``), atomically as :func:`save_checkpoint`
    does and on every rank as it; never pruned or resumed from by default, and ``--checkpoint <name>`` takes it."""
    final = _shared_root(run_dir) / name
    with _writing(final):
        _write_checkpoint(training, final, config_yaml, wall_seconds)
    return final


def _interrupted(root: Path) -> list[Path]:
    """Folders of checkpoint writes (``.NAME.tmp``) or replacements (``.NAME.damaged``) that did not finish."""
    return sorted(p for pattern in (".*.tmp", ".*.damaged") for p in root.glob(pattern) if p.is_dir())


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what writes cut short by a kill or a fault left in a run folder: unfinished checkpoint folders, a
    half-written ``checkpoints/latest`` and the temporary files of ``atomic_write_text``. Rank 0 calls it under
    the run's lock, before the run starts or resumes; returns what it removed."""
    root = Path(run_dir) / "checkpoints"
    found = [*_interrupted(root), *[p for p in [root / f"{LATEST}.tmp"] if p.is_file()], *partial_writes(run_dir)]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def _prune(root: Path, keep: int, current: Path) -> None:
    """Remove leftovers of interrupted writes and all but the newest ``keep`` checkpoints (never ``current``)."""
    for leftover in _interrupted(root):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in checkpoint_folders(root.parent)[keep:]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def _step(path: Path) -> int:
    return int(STEP_NAME.fullmatch(path.name).group(1))


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """``checkpoints/step_*`` folders of a run, newest first (complete by name, not yet verified)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and STEP_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=_step, reverse=True)


def verify_checkpoint(path: Path) -> CheckpointState:
    """The checkpoint's state once every file matches its sha256 in ``state.json``; else :class:`CheckpointError`."""
    path = Path(path)
    state = read_state(path)
    missing = sorted(set(REQUIRED) - set(state.files))
    if missing and "trainable.safetensors" in state.files:
        raise CheckpointError(f"checkpoint {path} is in the single-file format of an older flowgrove (no {SHARDS}/); "
                              f"{PICK}, or resume it with the flowgrove version that wrote it")
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {missing[0]} in {STATE}; the checkpoint is incomplete: {PICK}")
    for name, digest in sorted(state.files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing; {PICK}")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupt (its sha256 differs from {STATE}); {PICK}")
    _check_shards(path, state)
    return state


def _check_shards(path: Path, state: CheckpointState) -> None:
    """Every file the DCP metadata names is listed (so verified) in ``state.json``."""
    folder = path / SHARDS
    names = _read(folder / sharded.METADATA, lambda f: sharded.shard_files(folder))
    absent = sorted(n for n in names if f"{SHARDS}/{n}" not in state.files)
    if absent:
        raise CheckpointError(f"checkpoint file {folder / absent[0]} is missing (its DCP metadata names it); "
                              f"the checkpoint is incomplete: {PICK}")


def _intact(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def _named(run_dir: Path, name: str) -> Path:
    """The folder of an explicit ``--checkpoint step_N`` (any zero padding)."""
    match = STEP_NAME.fullmatch(name.strip())
    path = Path(run_dir) / "checkpoints" / (checkpoint_name(int(match.group(1))) if match else name)
    if not path.is_dir():
        have = ", ".join(p.name for p in checkpoint_folders(run_dir)) or "none"
        raise CheckpointError(f"{run_dir} has no checkpoint {name!r}; its checkpoints: {have}; pass one of them to --checkpoint")
    return path


def _pointer_note(root: Path, chosen: Path) -> str | None:
    """Why ``latest`` was not taken, or None when it names ``chosen``."""
    pointer = root / LATEST
    if not pointer.is_file():
        return f"{pointer} is missing"
    named = pointer.read_text(errors="replace").strip()
    if named == chosen.name:
        return None
    if not (root / named).is_dir() or not STEP_NAME.fullmatch(named):
        return f"{pointer} names {named!r}, which does not exist"
    return f"{pointer} names {named}, but {chosen.name} is newer"


def choose_checkpoint(run_dir: Path, name: str | None = None) -> Choice | None:
    """The checkpoint to resume: ``name`` (must verify), else the newest intact one. None when there is none."""
    if name:
        path = _named(run_dir, name)
        state = verify_checkpoint(path)
        return Choice(path, state, _unsealed_note(path, state))
    folders = checkpoint_folders(run_dir)
    notes: list[str] = []
    for path in folders:
        try:
            state = verify_checkpoint(path)
        except CheckpointError as err:
            notes.append(f"skipping {path.name}: {str(err).split('; ')[0]}")
            continue
        pointer = _pointer_note(path.parent, path)
        if pointer is not None and not notes:
            notes.append(pointer)
        if notes:
            notes.append(f"taking {path}, the newest intact checkpoint")
        return Choice(path, state, (*notes, *_unsealed_note(path, state)))
    if folders:
        reason = "; ".join(notes)
        raise CheckpointError(f"{run_dir} has no intact checkpoint ({reason}); start a new run with another --out")
    return None


def _unsealed_note(path: Path, state: CheckpointState) -> tuple[str, ...]:
    """A note for a ``state.json`` without its own checksum (written by an older flowgrove), else none."""
    if state.checksum:
        return ()
    return (f"{path / STATE} has no checksum of its own (an older flowgrove wrote it); only its iteration was checked, "
            "against the folder name",)


def discard_after(run_dir: Path, chosen: Path) -> list[Path]:
    """Remove the checkpoints newer than ``chosen`` (damaged, or of a future the run is going back from) and
    point ``latest`` at ``chosen``. Returns what was removed."""
    limit = _step(chosen) if STEP_NAME.fullmatch(chosen.name) else read_state(chosen).iteration  # e.g. ``best``
    newer = [p for p in checkpoint_folders(run_dir) if _step(p) > limit]
    atomic_write_text(Path(run_dir) / "checkpoints" / LATEST, chosen.name)
    for path in newer:
        shutil.rmtree(path, ignore_errors=True)
    return newer


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run (notes on stderr when ``latest`` was not it), or None."""
    choice = choose_checkpoint(run_dir)
    if choice is None:
        return None
    for note in choice.notes:
        print(f"flowgrove: {note}", file=sys.stderr)
    return choice.path


def _read(file: Path, loader: Callable[[Path], object]) -> object:
    try:
        return loader(file)
    except Exception as err:  # noqa: BLE001  (safetensors, pickle and zip errors of a damaged file)
        raise CheckpointError(f"checkpoint file {file} cannot be read ({type(err).__name__}); {PICK}") from None


def load_checkpoint(training: TrainingState, path: Path, state: CheckpointState | None = None) -> CheckpointState:
    """Load a checkpoint written by :func:`save_checkpoint` into the live tensors of a freshly built trainer's
    ``training`` state (verified first; under torchrun every rank calls it, on any number of ranks) and restore the
    global RNG. Returns the checkpoint's state: the caller takes back its iteration and counters
    (``trainer.restore(state.iteration, state.trainer)``)."""
    path = Path(path)
    state = state or verify_checkpoint(path)
    try:
        sharded.load(training, path / SHARDS)
    except sharded.ShardedError as err:
        raise CheckpointError(f"checkpoint {path} does not fit this trainer ({err}); was it written with another "
                              f"policy or LoRA setting? {PICK}") from None
    torch.set_rng_state(_read(path / "rng.safetensors", lambda f: load_file(str(f)))["torch_rng"])
    return state
