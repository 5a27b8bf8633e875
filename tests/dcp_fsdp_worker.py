"""A torchrun worker for test_sharded_checkpoint: FSDP2-shard a small model, train it, save it with DCP, and load
it back into freshly built FSDP2 modules, or load what another number of ranks saved.
``python dcp_fsdp_worker.py OUT save|load`` under torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from flowgrove.runs import sharded
from flowgrove.training.parts import TrainingState


def build(shard: bool, seed: int) -> TrainingState:
    """A trainer's state: two Linear blocks (one frozen bias), AdamW, EMA, KL reference."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 5))
    module[0].bias.requires_grad_(False)  # frozen: not in the checkpoint
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in (module[0], module[2]):
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    copies = [[p.detach().clone() for p in params] for _ in range(2)]
    return TrainingState(module, optimizer, params, ema=copies[0], reference=copies[1], iteration=0, counters={})


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(trainer: TrainingState) -> dict[str, Tensor]:
    """Full tensors of everything a checkpoint holds (collective under FSDP2)."""
    names = sharded.trainable_names(trainer.module)
    out = {}
    for n, p, e, r in zip(names, trainer.params, trainer.ema, trainer.reference):
        state = trainer.optimizer.state[p]
        out.update({f"param/{n}": _full(p), f"ema/{n}": _full(e), f"reference/{n}": _full(r),
                    f"exp_avg/{n}": _full(state["exp_avg"]), f"exp_avg_sq/{n}": _full(state["exp_avg_sq"]),
                    f"step/{n}": _full(state["step"]).reshape(1)})
    return out


def train(trainer: TrainingState, rank: int, steps: int = 2) -> None:
    """Rank-dependent data, so the shards' moments differ."""
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        trainer.module(torch.randn(4, 6, generator=g)).square().mean().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        with torch.no_grad():
            for e, r, p in zip(trainer.ema, trainer.reference, trainer.params):
                e.mul_(0.5).add_(p, alpha=0.5)
                r.add_(1.0)


def _same(expected: dict[str, Tensor], loaded: dict[str, Tensor]) -> bool:
    return expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)


def main(out: Path, mode: str) -> None:
    """``save``: train, save, load back on the same ranks; ``load``: load what another number of ranks saved."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "save":
        trainer = build(shard=True, seed=0)
        train(trainer, rank)
        sharded.save(trainer, out / "dcp")
        expected = snapshot(trainer)
        if rank == 0:
            save_file(expected, str(out / "expected.safetensors"))
    dist.barrier()
    expected = load_file(str(out / "expected.safetensors"))
    fresh = build(shard=True, seed=1)  # other weights, no optimizer state yet
    sharded.load(fresh, out / "dcp")
    first = fresh.params[0]
    local = isinstance(first, DTensor) and first.to_local().numel() < first.numel()
    same = _same(expected, snapshot(fresh))
    if rank == 0:
        (out / f"{mode}_{world}.txt").write_text(f"same={same} sharded={local}")
    from conftest import end_worker

    end_worker()  # instead of destroy_process_group: see conftest.end_worker


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
