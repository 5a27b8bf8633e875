"""Data parallelism through torch's engines (``run.parallel``): DistributedDataParallel for LoRA and small models,
FSDP2 (``fully_shard`` per transformer block, bf16 parameters and float32 reductions) for full fine-tunes.

The trainer sees one :class:`Engine`: ``engine.forward(fn)`` runs a closure that calls the policy (DDP must see the
forward to reduce the gradients of its backward), ``engine.gradient_sync(flag)`` turns the reduction off for every
micro-batch of an accumulation group but the last (``no_sync`` / ``set_requires_gradient_sync``). Under FSDP2 the
policy's module is sharded in place: its parameters become DTensors, and copies made from them (EMA, the KL
reference) are sharded the same way.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import warnings

import torch
from torch import nn

from flowgrove.messages import ConfigError
from flowgrove.parallel import distributed
from flowgrove.policies.quantize import transformer_blocks

T = TypeVar("T")
KINDS = ("auto", "none", "ddp", "fsdp")
OFFLOADS = ("none", "params")  # run.offload that torch's FSDP2 has (no optimizer-only offload: config.checks refuses it)
_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_kind(requested: str, world: int, lora_rank: int, offload: str = "none") -> str:
    """``run.parallel`` -> the engine: one process needs none; ``auto`` is DDP for LoRA (the adapters are small)
    and FSDP2 for a full fine-tune (fp32 masters, gradients and Adam state do not fit one GPU for 12 B weights).
    ``run.offload=params`` is FSDP2's, so it needs FSDP2: ``auto`` picks it, and under torchrun a single process
    runs FSDP2 too (on a one-rank mesh) so that one GPU can offload.

    Raises:
        ConfigError: an unknown kind, or ``run.offload`` with an engine that has no offload.
    """
    if requested not in KINDS:
        raise ConfigError(f"run.parallel={requested!r} is not allowed; choose one of: {', '.join(KINDS)}")
    if offload not in OFFLOADS:
        raise ConfigError(f"run.offload={offload!r} is not allowed here; choose one of: {', '.join(OFFLOADS)}")
    if offload == "params":
        return _offload_kind(requested, world)
    if world == 1:
        return "none"
    if requested == "auto":
        return "ddp" if lora_rank > 0 else "fsdp"
    return requested


def _offload_kind(requested: str, world: int) -> str:
    if requested not in ("auto", "fsdp"):
        raise ConfigError(f"run.offload=params is FSDP2's CPU offload, but run.parallel={requested}; set "
                          "run.parallel=fsdp (or auto), or run.offload=none")
    if world == 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError("run.offload=params is FSDP2's CPU offload, which needs a process group; launch with "
                          "torchrun (torchrun --nproc-per-node=1 -m flowgrove train ... on one GPU), or set "
                          "run.offload=none")
    return "fsdp"


class _Closure(nn.Module):
    """The module DDP wraps: its forward runs the trainer's closure, so DDP sees every training forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[[], T]) -> T:  # noqa: D102
        return fn()


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the policy's transformer blocks (:func:`transformer_blocks`)."""
    return transformer_blocks(module)


def _offload_policy(offload: str, device: torch.device) -> object:
    """FSDP2's offload policy of ``run.offload``: ``params`` keeps the shards of the parameters, their gradients and
    the optimizer state on the CPU (``CPUOffloadPolicy``; pinned memory for a GPU run), ``none`` keeps them on the
    device (``OffloadPolicy``, FSDP2's default)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload == "params" else OffloadPolicy()


def _fsdp(module: nn.Module, device: torch.device, param_dtype: torch.dtype | None, offload: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the policies use a block's output out of place, so FSDP2's warning about returned views does not apply
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (distributed.world_size_and_rank()[0],))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload_policy = _offload_policy(offload, device)
    for block in shard_units(module):
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload_policy)
    fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload_policy)


@dataclass
class Engine:
    """How the trainer's forward and backward passes reach torch's data-parallel engine."""

    kind: str  # none | ddp | fsdp
    module: nn.Module  # the policy's module (sharded in place under fsdp)
    ddp: nn.Module | None = None  # the DDP wrapper of a _Closure around ``module``

    def reshard(self) -> None:
        """Drop FSDP2's unsharded copies of the weights (the root keeps its own after a forward), so the next forward
        all-gathers what the shards hold now: needed whenever weights are written outside the optimizer."""
        if self.kind == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            for m in self.module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def forward(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a closure over the policy) as a training forward."""
        return self.ddp(fn) if self.ddp is not None else fn()

    @contextmanager
    def gradient_sync(self, sync: bool) -> Iterator[None]:
        """Reduce the gradients of the backward passes inside only when ``sync`` (the accumulation group's last)."""
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
            return
        with self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext():
            yield


def build_engine(kind: str, module: nn.Module, device: torch.device, dtype: str = "float32",
                 offload: str = "none") -> Engine:
    """Wrap (DDP) or shard (FSDP2, in place) ``module`` for ``kind`` from :func:`choose_kind`; ``offload``
    (``run.offload``, FSDP2 only) keeps the shards on the CPU."""
    if kind == "fsdp":
        _fsdp(module, device, _DTYPES[dtype], offload)
        return Engine("fsdp", module)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return Engine("ddp", module, DistributedDataParallel(_Closure(module), device_ids=ids, broadcast_buffers=False))
    return Engine("none", module)


def full_value(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (FSDP2 parameters, their gradient norm) gathered in full, else ``x``."""
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x
