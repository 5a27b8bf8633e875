"""The parts a recipe builds and hands to the trainer (torchtune's recipe/component split): the device, the data-parallel
engine (DDP or FSDP2, which shards the policy in place), the trainable parameters and the optimizer over them; and the
trainer's state as a checkpoint takes it and gives it back (:class:`TrainingState`); the numbers of one update
(:class:`UpdateStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from flowgrove.config.schema import Config
from flowgrove.parallel import distributed, engine
from flowgrove.policies.base import FlowPolicy


@dataclass
class TrainerParts:
    """Built once per run, before the trainer: everything the trainer uses but does not choose."""

    device: torch.device
    engine: engine.Engine
    params: list[Tensor]  # the trainable parameters (DTensor shards under FSDP2)
    optimizer: torch.optim.Optimizer


def _adamw8bit(params: list[Tensor], **kwargs: object) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, **kwargs)


# train.optimizer -> the optimizer class over (params, lr, betas, eps, weight_decay)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "adamw8bit": _adamw8bit}


def build_optimizer(cfg: Config, params: list[Tensor]) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params`` with ``train``'s learning rate, betas, eps and weight decay."""
    t = cfg.train
    return OPTIMIZERS[t.optimizer](params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)


def build_parts(cfg: Config, policy: FlowPolicy, device: torch.device) -> TrainerParts:
    """The engine of ``run.parallel`` (and ``run.offload``) around ``policy.module`` and ``train.optimizer`` over its
    trainable parameters."""
    world, _ = distributed.world_size_and_rank()
    kind = engine.choose_kind(cfg.run.parallel, world, cfg.policy.lora_rank, cfg.run.offload)
    built = engine.build_engine(kind, policy.module, device, cfg.policy.dtype, cfg.run.offload)  # FSDP2 shards in place
    params = [p for p in policy.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    return TrainerParts(device, built, params, build_optimizer(cfg, params))


@dataclass
class TrainingState:
    """The trainer's state as checkpoints see it: live tensors (saved from, and loaded into in place, by
    :mod:`flowgrove.runs.checkpoint`) and the counters that last across steps. The trainer hands it out
    (``GRPOTrainer.state()``) and takes back what a load returns (``GRPOTrainer.restore``)."""

    module: nn.Module  # the policy's module: trainable weights and buffers
    optimizer: torch.optim.Optimizer
    params: list[Tensor]  # the trainable parameters, in the module's order
    ema: list[Tensor] | None  # [same shapes as params] or None (train.ema_decay = 0)
    reference: list[Tensor] | None  # the KL reference weights, or None (train.kl_beta = 0)
    iteration: int  # completed training steps
    counters: dict  # JSON counters (the non-finite streak)


@dataclass
class UpdateStats:
    loss: float = 0.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    kl: float = 0.0
    tail_anchor: float = 0.0  # mean squared output difference to the initial policy at untrained steps (train.tail_anchor)
    grad_norm: float = 0.0
    first_ratio_max_dev: float = 0.0  # max |ratio - 1| in the first micro-batch, before any weight change
    last_pass_clip_fraction: float = 0.0  # clip_fraction of the last pass over the transitions (train.updates_per_rollout)
    last_pass_ratio_max_dev: float = 0.0  # max |ratio - 1| over the last pass (with one pass: over the update)
    updates: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient norm
    transitions: int = 0  # stored transitions trained, over all ranks (each pass counted)
    dropped_transitions: int = 0  # left out of the loss for a zero advantage (train.drop_zero_advantage), all ranks
