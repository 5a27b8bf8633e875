"""Data parallelism on CPU with gloo (DDP): two processes stay in sync and report the global batch's metrics."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowgrove.parallel import distributed

from conftest import free_port


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TinyPolicy, brightness

    from flowgrove.config.load import load_config
    from flowgrove.training.trainer import GRPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=4", "rewards={brightness: 1.0}",
                             "run.parallel=ddp"])
    cfg.rewards = {"brightness": 1.0}
    trainer = GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, ["zero", "one", "two", "three"])
    metrics = [trainer.step() for _ in range(2)]
    gathered = distributed.all_gather_cat(torch.cat([p.detach().flatten() for p in trainer.params])[None])
    torch.save({"params_equal": bool(torch.equal(gathered[0], gathered[1])), "reward": metrics[0]["reward_mean"],
                "engine": trainer.engine.kind, "prompts": trainer.step_prompt_ids.tolist()}, f"{out}/rank{rank}.pt")
    from conftest import end_worker

    end_worker()  # instead of destroy_process_group: see conftest.end_worker


def test_two_ranks_keep_identical_weights(tmp_path):
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["params_equal"] and r1["params_equal"] and r0["engine"] == r1["engine"] == "ddp"
    assert r0["reward"] == r1["reward"]  # the metrics are those of the global batch
    assert r0["prompts"] != r1["prompts"]  # each rank rolled out its own share (one prompt's group each)


def test_helpers_without_a_process_group():
    x = torch.arange(6.0).view(3, 2)
    assert distributed.world_size_and_rank() == (1, 0)
    assert torch.equal(distributed.all_gather_cat(x), x)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
