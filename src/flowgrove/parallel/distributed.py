"""Optional data parallelism (torchrun; gloo on CPU). Every helper works without ``init_process_group``."""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def world_size_and_rank() -> tuple[int, int]:
    """(1, 0) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def resolve_device(requested: str = "auto") -> torch.device:
    """``run.device`` -> this process's device: ``auto`` is CUDA when present, else the CPU; under torchrun each
    rank uses ``cuda:LOCAL_RANK`` (and makes it the current CUDA device)."""
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise ValueError(f"run.device={requested!r} is not one of auto, cpu, cuda, cuda:N")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"run.device={requested} but this machine has no CUDA device; use run.device=cpu (or auto)")
    index = int(requested.split(":")[1]) if ":" in requested else int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_from_env(device: torch.device | None = None, timeout: float | None = None) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment, if any: NCCL for CUDA devices,
    gloo for the CPU. ``timeout`` (``run.collective_timeout``, seconds) bounds every collective, so a dead peer
    ends the run instead of hanging it; given once the group exists, it replaces the group's timeout."""
    from flowgrove.parallel.faults import collective_timeout

    limit = collective_timeout(timeout) if timeout is not None else None
    check_launcher_env(os.environ)
    if "RANK" in os.environ and not dist.is_initialized():
        device = device or resolve_device("auto")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **({"timeout": limit} if limit else {}))
    elif limit is not None and dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(limit)
    return world_size_and_rank()


LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for every worker


def check_launcher_env(env: dict[str, str] | os._Environ) -> None:
    """A distributed launch sets all of ``LAUNCHER_KEYS``; a partial set (``WORLD_SIZE=2`` exported by hand, a
    script run without torchrun) is a ``ValueError`` that names what is missing, rather than one process training
    alone or torch's rendezvous error. ``WORLD_SIZE=1`` alone is a single process and fine."""
    present = [k for k in LAUNCHER_KEYS if k in env]
    if not present or (present == ["WORLD_SIZE"] and env["WORLD_SIZE"] == "1"):
        return
    missing = [k for k in LAUNCHER_KEYS if k not in env]
    if missing:
        shown = ", ".join(f"{k}={env[k]}" for k in present)
        raise ValueError(f"{shown} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start "
                         "data-parallel runs with `torchrun --nproc-per-node N -m flowgrove train ...`, or unset "
                         f"{', '.join(present)} to train in one process")


def _collective_device() -> torch.device:
    """Where small control tensors must live for the process group's backend (NCCL: the current CUDA device)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0 (identity on one process)."""
    world, _ = world_size_and_rank()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    """``op`` over the ranks of each number (float64 control tensor on the backend's device); unchanged on one process."""
    if world_size_and_rank()[0] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank, so all ranks take the same branch (no deadlock)."""
    return _all_reduce([float(flag)], dist.ReduceOp.MAX)[0] > 0


def all_equal(value: int) -> bool:
    """True on every rank when ``value`` is the same on all ranks."""
    if world_size_and_rank()[0] == 1:
        return True
    values = all_gather_cat(torch.tensor([value], device=_collective_device(), dtype=torch.long))
    return bool((values == values[0]).all())


def mean_over_ranks(values: list[float]) -> list[float]:
    """The mean over ranks of each number (metrics of equally sized per-rank batches); unchanged on one process."""
    world, _ = world_size_and_rank()
    return [v / world for v in _all_reduce(values, dist.ReduceOp.SUM)]


def sum_over_ranks(values: list[float]) -> list[float]:
    """The sum over ranks of each number; unchanged on one process."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def weighted_mean_over_ranks(values: list[float], weight: float) -> list[float]:
    """The mean over ranks of each number, rank r weighted by its ``weight`` (metrics of unequal per-rank batches:
    ``sum_r weight_r * v_r / sum_r weight_r``, 0 where every weight is 0); unchanged on one process."""
    if world_size_and_rank()[0] == 1:
        return list(values)
    *sums, total = _all_reduce([weight * v for v in values] + [weight], dist.ReduceOp.SUM)
    return [s / total if total else 0.0 for s in sums]


def max_over_ranks(value: float) -> float:
    return _all_reduce([value], dist.ReduceOp.MAX)[0]


def is_main() -> bool:
    return world_size_and_rank()[1] == 0


def from_main(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank; the identity on one process."""
    world, _ = world_size_and_rank()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object) in rank order, on every rank; ``[value]`` on one process."""
    world, _ = world_size_and_rank()
    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out
