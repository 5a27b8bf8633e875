"""The periodic evaluation split across two gloo ranks (under FSDP2 and under DDP) equals the one-process evaluation.

9 evaluation rows (3 prompts x 3 seeds) are padded to 10, so rank 1 samples a copy of the last row that the gather
drops; ``sampler.chunk_size=2`` chunks each rank's 5 rows into model calls of 2, 2 and 1 rows on both ranks (under
FSDP2 every rank must call the forward equally often with the same shapes).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowgrove.config.load import load_config
from flowgrove.parallel import distributed

from test_distributed_equivalence import _free_port

PROMPTS = ["zero", "one", "two"]
OVERRIDES = ["rewards={brightness: 1.0}", "eval.judges=[contrast]", "eval.samples_per_prompt=3", "eval.num_steps=4",
             "eval.hybrid_steps=2", "sampler.chunk_size=2"]


class EmbeddedBrightness:
    """Brightness with an image embedding (the diversity features come from the first reward with ``embed``)."""

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))  # [B]

    def embed(self, images):
        return images[:, 0].flatten(1) * 2  # [B, 16]


def _evaluate(engine: str = "auto") -> dict:
    """A trainer whose weights moved away from the base, evaluated once; every forward call's batch size logged.
    ``engine`` is ``run.parallel`` (one process has none)."""
    from conftest import TinyPolicy

    from flowgrove.evaluation.evaluate import build_setup, evaluate_step, snapshot
    from flowgrove.training.trainer import GRPOTrainer

    cfg = load_config(None, [*OVERRIDES, f"run.parallel={engine}"], method="dancegrpo")
    trainer = GRPOTrainer(cfg, TinyPolicy(), {"brightness": EmbeddedBrightness()}, PROMPTS)
    base = snapshot(trainer.state())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainer.params:
            delta = 0.3 * torch.randn(p.shape, generator=gen)  # p.shape is the full shape, also of an FSDP2 shard
            if hasattr(p, "device_mesh"):  # two ranks shard the weights (run.parallel=auto: FSDP2 for a full fine-tune)
                from torch.distributed.tensor import distribute_tensor

                delta = distribute_tensor(delta, p.device_mesh, p.placements)
            p.add_(delta)
    calls: list[int] = []
    velocity = trainer.policy.velocity

    def counted(x, sigma, cond):
        calls.append(x.shape[0])
        return velocity(x, sigma, cond)

    trainer.policy.velocity = counted
    record = evaluate_step(trainer.held_out(), build_setup(trainer.held_out(), base), trainer.iteration)
    held_out = trainer.evaluate()
    return {"metrics": record.metrics, "images": record.images, "hybrid": record.hybrid_images,
            "held_out": dict(held_out), "held_out_images": held_out.images, "calls": calls, "engine": trainer.engine.kind}


def _worker(rank: int, world: int, port: int, out: str, engine: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    distributed.init_from_env()
    torch.save(_evaluate(engine), f"{out}/rank{rank}.pt")
    from conftest import end_worker

    end_worker()  # instead of destroy_process_group: see conftest.end_worker


@pytest.fixture(scope="module", params=["fsdp", "ddp"])
def ranks(request, tmp_path_factory):
    """Both ranks' evaluations under FSDP2 (sharded weights, collectives inside the forward) and under DDP."""
    out = tmp_path_factory.mktemp("eval_ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out), request.param), nprocs=2, join=True)
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert [r["engine"] for r in results] == [request.param] * 2
    return results


def _same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key


def test_two_ranks_evaluate_like_one_process(ranks):
    single = _evaluate()
    assert single["hybrid"] is not None and "eval/hybrid/judge/contrast" in single["metrics"]
    assert single["metrics"]["eval/kl"] > 0 and single["metrics"]["eval/mmd2"] > 0
    for result in ranks:  # every rank holds the whole evaluation
        _same_numbers(result["metrics"], single["metrics"])
        _same_numbers(result["held_out"], single["held_out"])
        for key in ("images", "hybrid", "held_out_images"):
            assert result[key].shape == single[key].shape == (9, 3, 4, 4)
            torch.testing.assert_close(result[key], single[key], rtol=0, atol=1e-5)


def test_every_rank_calls_the_model_equally_often_with_the_same_shapes(ranks):
    r0, r1 = (r["calls"] for r in ranks)
    assert r0 == r1 and set(r0) == {2, 1}  # 5 rows per rank (one of rank 1's is padding) in chunks of 2, 2, 1


def test_the_held_out_result_is_kept_until_the_weights_change():
    """Rank 0's end-of-run summary calls ``evaluate`` alone after every rank did: it must not sample (or gather) again."""
    from conftest import TinyPolicy

    from flowgrove.training.trainer import GRPOTrainer

    cfg = load_config(None, [*OVERRIDES, "train.ema_decay=0.5"], method="dancegrpo")
    trainer = GRPOTrainer(cfg, TinyPolicy(), {"brightness": EmbeddedBrightness()}, PROMPTS)
    first = trainer.evaluate()
    assert trainer.evaluate() is first  # the EMA swap inside evaluate does not count as a change
    with torch.no_grad():
        trainer.params[0].add_(1.0)
    again = trainer.evaluate()  # any written weight evaluates again (here to the same numbers: the EMA is unchanged)
    assert again is not first and again["reward"] == first["reward"]
    with torch.no_grad():
        trainer.ema[0].add_(1.0)
    changed = trainer.evaluate()
    assert changed is not again and changed["reward"] != first["reward"]
    assert trainer.evaluate() is changed
    trainer.step()
    assert trainer.evaluate() is not changed
