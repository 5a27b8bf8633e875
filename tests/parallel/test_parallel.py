"""The choice of data-parallel engine, FSDP2's units and its mixed precision (one real gloo process)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from flowgrove.config.load import ConfigError
from flowgrove.parallel import engine


@pytest.mark.parametrize("requested, world, lora_rank, kind", [
    ("auto", 1, 0, "none"), ("auto", 1, 4, "none"), ("fsdp", 1, 0, "none"),  # one process: no engine
    ("auto", 2, 4, "ddp"), ("auto", 8, 0, "fsdp"),  # LoRA: DDP; a full fine-tune: FSDP2
    ("ddp", 2, 0, "ddp"), ("fsdp", 2, 4, "fsdp"), ("none", 2, 0, "none"),  # as asked
])
def test_the_engine_follows_run_parallel_and_the_lora_rank(requested, world, lora_rank, kind):
    assert engine.choose_kind(requested, world, lora_rank) == kind


@pytest.mark.parametrize("requested, lora_rank", [("auto", 4), ("auto", 0), ("fsdp", 4)])
def test_cpu_offload_is_fsdp2s(requested, lora_rank):
    assert engine.choose_kind(requested, 2, lora_rank, "params") == "fsdp"  # LoRA too: the offload is FSDP2's
    with pytest.raises(ConfigError, match="run.offload=params .*process group.*torchrun --nproc-per-node=1"):
        engine.choose_kind(requested, 1, lora_rank, "params")  # one process without torchrun: no FSDP2 mesh
    with pytest.raises(ConfigError, match="run.offload=params .*run.parallel=ddp; set run.parallel=fsdp"):
        engine.choose_kind("ddp", 2, lora_rank, "params")


def test_an_unknown_engine_is_a_one_line_error():
    with pytest.raises(ConfigError, match="run.parallel='zero3'.*ddp, fsdp"):
        engine.choose_kind("zero3", 2, 0)


def test_fsdp2_units_are_the_transformer_blocks():
    from flowgrove.policies.digits import new_transformer

    model = new_transformer()
    units = engine.shard_units(model)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert len(units) == len(blocks) and all(u is b for u, b in zip(units, blocks))
    assert engine.shard_units(nn.Linear(2, 2)) == []  # no blocks: only the root is sharded
    pair = nn.ModuleDict({"transformer": model, "transformer_2": new_transformer()})  # two experts, as Wan 2.2's
    assert len(engine.shard_units(pair)) == 2 * len(blocks) and engine.shard_units(pair)[0] is blocks[0]


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        self.seen = []
        for block in self.blocks:
            x = block(x)
            self.seen.append(x.dtype)
        return x


def _mixed_precision_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = _Blocks()
    built = engine.build_engine("fsdp", model, torch.device("cpu"), "bfloat16")
    y = built.forward(lambda: model(torch.randn(3, 4)))
    y.float().sum().backward()
    params = list(model.parameters())
    torch.save({"compute": [str(d) for d in model.seen], "masters": sorted({str(p.dtype) for p in params}),
                "grads": sorted({str(p.grad.dtype) for p in params}), "kinds": sorted({type(p).__name__ for p in params})},
               out)
    from conftest import end_worker

    end_worker()  # instead of destroy_process_group: see conftest.end_worker


def test_fsdp2_computes_in_bf16_over_float32_masters_and_gradients(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_mixed_precision_worker, args=(port, str(tmp_path / "r.pt")), nprocs=1, join=True)
    r = torch.load(tmp_path / "r.pt")
    assert r["compute"] == ["torch.bfloat16"] * 2  # every block ran on bf16 all-gathered weights
    assert r["masters"] == ["torch.float32"] and r["grads"] == ["torch.float32"] and r["kinds"] == ["DTensor"]
