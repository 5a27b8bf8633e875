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

T = TypeVar("T")
KINDS = ("auto", "none", "ddp", "fsdp")
_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_kind(requested: str, world: int, lora_rank: int) -> str:
    """``run.parallel`` -> the engine: one process needs none; ``auto`` is DDP for LoRA (the adapters are small)
    and FSDP2 for a full fine-tune (fp32 masters, gradients and Adam state do not fit one GPU for 12 B weights)."""
    if requested not in KINDS:
        raise ConfigError(f"run.parallel={requested!r} is not allowed; choose one of: {', '.join(KINDS)}")
    if world == 1:
        return "none"
    if requested == "auto":
        return "ddp" if lora_rank > 0 else "fsdp"
    return requested


class _Closure(nn.Module):
    """The module DDP wraps: its forward runs the trainer's closure, so DDP sees every training forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[[], T]) -> T:  # noqa: D102
        return fn()


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: every element of the module's top-level ``nn.ModuleList``s
    (diffusers' ``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, a UNet's ``down_blocks`` ...); a
    module without such lists that holds whole models (Wan 2.2's two experts) gives its children's units."""
    blocks = [block for child in module.children() if isinstance(child, nn.ModuleList) for block in child]
    return blocks or [unit for child in module.children() for unit in shard_units(child)]


def _fsdp(module: nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the policies use a block's output out of place, so FSDP2's warning about returned views does not apply
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (distributed.world_size_and_rank()[0],))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in shard_units(module):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


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


def build_engine(kind: str, module: nn.Module, device: torch.device, dtype: str = "float32") -> Engine:
    """Wrap (DDP) or shard (FSDP2, in place) ``module`` for ``kind`` from :func:`choose_kind`."""
    if kind == "fsdp":
        _fsdp(module, device, _DTYPES[dtype])
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
