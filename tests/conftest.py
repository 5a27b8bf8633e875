"""Shared fixtures: a tiny download-free policy and reward for trainer and rollout tests."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning

# The tests mirror the package in folders (tests/samplers, tests/grpo, ...); a few import a neighbour's helpers by module
# name (``from test_policies import ...``), so every folder is importable whatever order pytest collects them in.
for _folder in sorted(Path(__file__).parent.iterdir()):
    if _folder.is_dir() and not _folder.name.startswith((".", "_")) and str(_folder) not in sys.path:
        sys.path.append(str(_folder))

# A CI runner may start the suite with SIGINT ignored (a background job of a non-interactive shell inherits SIG_IGN,
# and so would every process a test starts): the Ctrl-C tests need the usual disposition here and in children.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Tiny models run fastest on one thread, and two threads per process slow the suite badly when anything else
# uses the machine's two cores.
torch.set_num_threads(1)


class TinyVelocity(nn.Module):
    """A small MLP velocity field on [B, 1, 4, 4] latents, conditioned on sigma and a pooled embedding."""

    def __init__(self, dim: int = 16, cond_dim: int = 8, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1 + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, sigma: Tensor, pooled: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), sigma[:, None], pooled], dim=1)  # [B, 16 + 1 + 8]
        return self.net(h).view_as(x)


class TinyPolicy:
    """FlowPolicy over [1, 4, 4] latents (lucidrains-style tiny model for tests)."""

    latent_shape = (1, 4, 4)

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = TinyVelocity()

    def default_prompts(self) -> list[str]:
        return ["zero", "one", "two"]

    def encode_prompts(self, prompts) -> Conditioning:
        rows = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompts]
        pooled = torch.stack([torch.randn(8, generator=g) for g in rows])  # [B, 8]
        return Conditioning(prompt_embeds=pooled[:, None, :], pooled=pooled)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.module(x, sigma, cond.pooled)

    def decode(self, x: Tensor) -> Tensor:
        return ((x + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)  # [B, 3, 4, 4]


def brightness(images: Tensor, prompts) -> Tensor:
    return images.float().mean(dim=(1, 2, 3))  # [B]


@pytest.fixture
def tiny_policy() -> TinyPolicy:
    return TinyPolicy()


def restore_checkpoint(trainer, path, state=None):
    """Load a checkpoint into ``trainer`` as the recipes do: tensors in place, then the step and counters back."""
    from flowgrove.runs.checkpoint import load_checkpoint

    loaded = load_checkpoint(trainer.state(), path, state)
    trainer.restore(loaded.iteration, loaded.trainer)
    return loaded


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free now (for a test's own process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_worker() -> None:
    """End a test's rank process once its results are written: every rank waits for the others, then exits at once.
    Under load, gloo's threads sometimes abort the interpreter's teardown after the work is done ("terminate called
    without an active exception", SIGABRT: 3 of 6 full runs on the 2-core machine, each time after the results were
    saved); exiting without running those destructors keeps a finished rank from failing its test."""
    import os

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
