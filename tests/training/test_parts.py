"""The trainer's parts: train.optimizer's table against the schema's choices, and the optimizer it builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowgrove.config import schema
from flowgrove.config.load import load_config
from flowgrove.parallel import engine
from flowgrove.training import parts


def _choices(section: type, name: str) -> tuple[str, ...]:
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["choices"]


def test_the_schemas_choices_are_the_tables():
    assert _choices(schema.TrainConfig, "optimizer") == tuple(parts.OPTIMIZERS)
    assert set(engine.OFFLOADS) | {"optimizer"} == set(_choices(schema.RunConfig, "offload"))  # optimizer: refused


@pytest.mark.parametrize("name", list(parts.OPTIMIZERS))
def test_train_optimizer_builds_adamw_with_the_train_settings(name):
    if name == "adamw8bit":
        pytest.importorskip("torchao")
    cfg = load_config(None, [f"train.optimizer={name}", "train.lr=0.01", "train.betas=[0.8,0.9]", "train.adam_eps=1e-6",
                             "train.weight_decay=0.5"])
    optimizer = parts.build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(4))])
    assert type(optimizer).__name__ == {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}[name]
    group = optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (0.01, (0.8, 0.9), 1e-6, 0.5)
