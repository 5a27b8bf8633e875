"""The parts a recipe builds and hands to the trainer (torchtune's recipe/component split): the device, the data-parallel
engine (DDP or FSDP2, which shards the policy in place), the trainable parameters and the optimizer over them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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


def build_parts(cfg: Config, policy: FlowPolicy, device: torch.device) -> TrainerParts:
    """The engine of ``run.parallel`` around ``policy.module`` and AdamW over its trainable parameters."""
    world, _ = distributed.world_size_and_rank()
    kind = engine.choose_kind(cfg.run.parallel, world, cfg.policy.lora_rank)
    built = engine.build_engine(kind, policy.module, device, cfg.policy.dtype)  # FSDP2 shards in place
    params = [p for p in policy.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    return TrainerParts(device, built, params, optimizer)
