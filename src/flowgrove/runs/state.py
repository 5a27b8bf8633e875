"""``state.json``, the record of a checkpoint folder besides its tensors: the iteration, the world size, the wall
time, the sha256 of every other file and the counters, sealed by the sha256 of its own other fields. An edited
``state.json`` (its checksum differs, or a ``step_N`` folder's iteration is not N) is refused, never taken: an edited
iteration would silently skip steps. A ``state.json`` of an older flowgrove has no checksum; only the folder name
checks its iteration.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

STATE = "state.json"
STEP_NAME = re.compile(r"step_(\d+)")  # a checkpoint folder of a step
PICK = "pick another with `--checkpoint step_N` or resume without it to take the newest intact one"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupt; the message names the file and the fix (one line)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a read-only folder); what the write left was removed and the
    checkpoints written before are as they were. The message names the checkpoint and the OS error (one line)."""


@dataclass(frozen=True)
class CheckpointState:
    """What ``state.json`` records besides the weights."""

    iteration: int
    world_size: int  # processes of the run that wrote it (DCP reshards for another number on load)
    wall_seconds: float  # training wall time of the whole run up to this checkpoint, over all resumes
    files: dict  # file name -> sha256 hex digest of every other file in the folder
    trainer: dict = field(default_factory=dict)  # TrainingState.counters: counters that last across steps
    checksum: str = ""  # sha256 of state.json's other fields (see state_checksum); "" in an older flowgrove's


def state_checksum(data: dict) -> str:
    """sha256 of ``state.json``'s fields other than ``checksum``, as canonical JSON (sorted keys, no spaces)."""
    body = {key: value for key, value in data.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_state(folder: Path, data: dict) -> None:
    """Write ``folder/state.json``: ``data`` and the checksum of its own content."""
    (Path(folder) / STATE).write_text(json.dumps({**data, "checksum": state_checksum(data)}, indent=1))


def read_state(path: Path) -> CheckpointState:
    """``state.json`` of a checkpoint folder, checked for shape, against its own checksum and, in a ``step_N``
    folder, against the folder's step (not yet the checksums of the other files)."""
    file = Path(path) / STATE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete: {PICK}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint file {file} is truncated or not JSON; {PICK}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"checkpoint file {file} lists no file checksums (written by an older flowgrove or "
                              f"damaged); {PICK}, or start a new run")
    try:
        state = CheckpointState(int(data["iteration"]), int(data.get("world_size", 1)),
                                float(data.get("wall_seconds", 0.0)), dict(data["files"]), dict(data.get("trainer", {})),
                                str(data.get("checksum", "")))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint file {file} has no valid iteration; {PICK}") from None
    if state.checksum and state.checksum != state_checksum(data):
        raise CheckpointError(f"checkpoint file {file} does not match its own checksum (edited or damaged after it "
                              f"was written); {PICK}")
    named = STEP_NAME.fullmatch(Path(path).name)
    if named and int(named.group(1)) != state.iteration:
        raise CheckpointError(f"checkpoint file {file} says iteration {state.iteration}, but its folder is "
                              f"{Path(path).name}; {PICK}")
    return state
