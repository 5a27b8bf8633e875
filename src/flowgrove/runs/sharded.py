"""The tensors of a checkpoint as one ``torch.distributed.checkpoint`` (DCP) folder, written by every rank.

One DCP state holds four parts: ``model`` (the trainable weights, and the module's buffers, as
``get_state_dict(..., StateDictOptions(ignore_frozen_params=True))`` gives them less a quantised base's own state:
plain tensors of a single process or DDP, DTensor shards under FSDP2), ``optim`` (AdamW's moments keyed by parameter name; absent before
the first optimizer step), and ``ema`` / ``reference`` (dicts keyed by parameter name, sharded like the weights).
Each rank writes its own ``__RANK_0.distcp`` and rank 0 the ``.metadata``; DCP reshards on load, so a folder
written by N ranks loads on M ranks, or in one process without a process group (``flowgrove export``).

Loading never unpickles arbitrary objects: tensors and the optimizer's hyperparameters are read with
``torch.load(weights_only=True)`` and the metadata with an unpickler that admits DCP's own metadata records only.
"""

from __future__ import annotations

import io
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

METADATA = ".metadata"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_SET = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen weights stay as the policy built them
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)
if TYPE_CHECKING:
    from flowgrove.training.parts import TrainingState

_NO_DIST = "torch.distributed is disabled, unavailable or uninitialized"


class ShardedError(ValueError):
    """A DCP folder that cannot be read or does not fit the trainer; the message is one line."""


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` records (sizes, dtypes, chunk offsets, file names) and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if module == _METADATA_MODULE or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def read_metadata(folder: Path) -> Metadata:
    """The ``.metadata`` of a DCP folder, unpickled with DCP's own record types only."""
    with (Path(folder) / METADATA).open("rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{METADATA} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class _Reader(FileSystemReader):
    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    def load_bytes(self, read_item: object, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything but plain data (numbers, strings, tuples)
        value.seek(0)
        super().load_bytes(read_item, value)


def shard_files(folder: Path) -> set[str]:
    """The file names (relative to ``folder``) that the metadata says hold the tensors."""
    return {info.relative_path for info in read_metadata(folder).storage_data.values()}


def stored_parts(folder: Path) -> set[str]:
    """Which of ``model``, ``optim``, ``ema``, ``reference`` the folder holds."""
    return {key.split(".", 1)[0] for key in read_metadata(folder).state_dict_metadata}


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def trained_and_buffers(module: nn.Module, model: dict) -> dict:
    """``model`` (``get_model_state_dict``'s) without what a frozen layer writes beside its parameters (the NF4 state
    of a quantised base, bitsandbytes' ``...weight.absmax``, ``.quant_map``: rebuilt with the policy, never trained):
    the trainable weights and the module's buffers."""
    keep = set(trainable_names(module)) | {name for name, _ in module.named_buffers()}
    return {key: value for key, value in model.items() if key in keep}


def training_state(state: TrainingState, with_optimizer: bool) -> dict[str, dict]:
    """The DCP state of a trainer's state (views of its live tensors, so a load writes into them)."""
    module = state.module
    if with_optimizer:
        model, optim = get_state_dict(module, state.optimizer, options=_OPTIONS)
        out = {"model": trained_and_buffers(module, model), "optim": optim}
    else:
        out = {"model": trained_and_buffers(module, get_model_state_dict(module, options=_OPTIONS))}
    names = trainable_names(module)
    for part in ("ema", "reference"):
        if getattr(state, part) is not None:
            out[part] = dict(zip(names, getattr(state, part)))
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns in a single process that it assumes a single process, which is what it should do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST)
        yield


def save(training: TrainingState, folder: Path) -> None:
    """Write the trainer's tensors into ``folder`` (collective: every rank calls it with the same folder).

    DCP reports a failed write on any rank to every rank as a ``CheckpointException``, which is no ``Exception``
    (a ``BaseException``, so it would pass every handler); it is raised here as the lowest failed rank's own error:
    an ``OSError`` keeps its errno (a full disk stays ENOSPC) and names ``folder``, anything else is a
    :class:`ShardedError`."""
    state = training_state(training, with_optimizer=bool(training.optimizer.state))
    try:
        with _quiet():
            dcp.save(state, storage_writer=FileSystemWriter(str(folder)))
    except CheckpointException as err:
        rank = min(err.failures, default=0)
        cause = err.failures[rank][0] if err.failures else err
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(folder)) from cause
        raise ShardedError(f"rank {rank}: {_last_line(cause)}") from cause


def _last_line(err: BaseException) -> str:
    """``Type: message`` of an error, its last non-empty line (DCP joins every rank's traceback into one text)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}".strip()


def _load(state: dict, folder: Path) -> None:
    try:
        with _quiet():
            dcp.load(state, storage_reader=_Reader(str(folder)), planner=_Planner())
    except (Exception, CheckpointException) as err:  # noqa: BLE001  (DCP wraps every rank's failure; one line)
        raise ShardedError(_last_line(err)) from None


def load(training: TrainingState, folder: Path) -> None:
    """Restore the trainer's weights, optimizer, EMA and reference from ``folder`` (collective; any world size)."""
    parts = stored_parts(folder)
    expected = {"model"} | {p for p in ("ema", "reference") if getattr(training, p) is not None}
    if expected - parts:
        raise ShardedError(f"it holds no {sorted(expected - parts)[0]} tensors (written with another train.ema_decay "
                           "or train.kl_beta?)")
    state = training_state(training, with_optimizer="optim" in parts)
    if "optim" in parts:
        state["optim"] = _saved_only(state["optim"], set(read_metadata(folder).state_dict_metadata))
    _load(state, folder)
    if "optim" not in parts:
        set_model_state_dict(training.module, state["model"], options=_SET)
        return
    set_state_dict(training.module, training.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_SET)
    saved = set(state["optim"]["state"])
    for name, param in zip(trainable_names(training.module), training.params):
        if name not in saved:  # as in the saved run: AdamW starts a parameter's state at its first gradient
            training.optimizer.state.pop(param, None)


def _saved_only(optim: dict, keys: set[str]) -> dict:
    """The optimizer state of the parameters that had one when the checkpoint was written (a parameter that has
    had no gradient yet, e.g. outside the trained window, has none)."""
    kept = {fqn: values for fqn, values in optim["state"].items()
            if all(f"optim.state.{fqn}.{k}" in keys for k in values)}
    return {**optim, "state": kept}


def load_full(module: nn.Module, folder: Path, part: str = "model") -> None:
    """Load the full trainable weights (``model``) or their EMA (``ema``) into a plain module in one process,
    whatever number of ranks wrote the folder."""
    if part == "model":
        state = get_model_state_dict(module, options=_OPTIONS)
        _load({"model": state}, folder)
        set_model_state_dict(module, state, options=_SET)
        return
    targets: dict[str, Tensor] = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    _load({part: targets}, folder)
