"""Two gloo ranks against one process: the same transitions get the same advantages and the same update.

Each rank rolls out its own prompts and noise. One process given both ranks' rewards and transitions must
compute the same advantages (group statistics over all ranks, each rank keeping its own rows) and, with one
optimizer step per rollout, land on the same weights with the same gradient norm.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowgrove import distributed, method, tree
from flowgrove.config import load_config
from flowgrove.rollout import Transitions

from test_behaviour import depthwise, zscore

# One AdamW step per rollout on one micro-batch. A large Adam eps and no clipping make the step size depend on the
# gradient's scale, so summed instead of averaged gradients change the weights (Adam alone is scale-invariant).
COMMON = ["rewards={brightness: 1.0}", "train.micro_batch=100000", "train.accumulate=transitions",
          "train.accumulate_size=100000", "train.adam_eps=1.0e-4", "train.max_grad_norm=0", "train.lr=1.0e-3"]
CASES = {
    "chains": ("dancegrpo", ["rollout.prompts_per_step=2", "rollout.group_size=4", "advantage.ddof=1"]),
    "global_std": ("flowgrpo", ["rollout.prompts_per_step=2", "rollout.group_size=4", "advantage.kind=group_global_std",
                                "advantage.ddof=0", "advantage.eps=0"]),
    "trees": ("branchgrpo", ["rollout.prompts_per_step=1", "tree.fusion=path", "tree.temperature=0.5"]),
}
PROMPTS = ["zero", "one", "two", "three", "four"]


def _config(case: str):
    name, extra = CASES[case]
    cfg = load_config(None, COMMON + extra, method=name)
    cfg.rewards = {"brightness": 1.0}
    return cfg


def _trainer(case: str):
    from conftest import TinyPolicy, brightness

    from flowgrove.trainer import GRPOTrainer

    # global_std: one prompt, so the ranks' rewards differ only through their noise
    prompts = PROMPTS[:1] if case == "global_std" else PROMPTS
    return GRPOTrainer(_config(case), TinyPolicy(), {"brightness": brightness}, prompts)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    results = {"joined": distributed.init_from_env(), "main": distributed.is_main()}  # the torchrun environment
    results["joined_again"] = distributed.init_from_env()  # a second call keeps the group
    for case in CASES:
        trainer = _trainer(case)
        seen: dict = {}
        score, update = trainer.score, trainer.update

        def spy_score(ro, *args, score=score, seen=seen):
            raw = score(ro, *args)
            seen.update(raw=raw.clone(), edge_log_probs=[lp.clone() for lp in ro.edge_log_probs])
            return raw

        def spy_update(tr, adv, n_samples, generator, update=update, seen=seen, **kwargs):
            seen.update(transitions=[t.clone() for t in tr], adv=adv.clone(), n_samples=n_samples)
            return update(tr, adv, n_samples, generator, **kwargs)

        trainer.score, trainer.update = spy_score, spy_update
        seen["metrics"] = trainer.step()
        seen["prompt_ids"] = trainer.step_prompt_ids.clone()  # the step's rows: cond_index is local to them
        seen["params"] = [p.detach().clone() for p in trainer.params]
        results[case] = seen
    results["nan"] = _nan_on_rank_one(rank)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _nan_on_rank_one(rank: int) -> dict:
    """A reward that is NaN on rank 1 only: both ranks must stop the step (no rank left waiting in a collective)."""
    from conftest import TinyPolicy, brightness

    from flowgrove.trainer import GRPOTrainer, NonFiniteRewardError

    def reward(images, prompts):
        return brightness(images, prompts) * (float("nan") if rank == 1 else 1.0)

    trainer = GRPOTrainer(_config("chains"), TinyPolicy(), {"brightness": reward}, PROMPTS)
    before = [p.detach().clone() for p in trainer.params]
    try:
        trainer.step()
    except NonFiniteRewardError as err:
        message = str(err)
    else:
        message = ""
    unchanged = all(torch.equal(b, p) for b, p in zip(before, trainer.params))
    return {"message": message, "unchanged": unchanged, "iteration": trainer.iteration}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for per_rank in results:
        for case in CASES:  # saved as a list of tensors: torch.load only restores plain containers
            per_rank[case]["transitions"] = Transitions(*per_rank[case]["transitions"])
    return results


def _check_update(case: str, ranks: list[dict]) -> None:
    """One process trained on both ranks' transitions and advantages reaches the ranks' weights."""
    r0, r1 = ranks
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["n_samples"] == r1["n_samples"] and r0["adv"].shape == r1["adv"].shape
    trainer = _trainer(case)
    union = Transitions(*(torch.cat(pair) for pair in zip(r0["transitions"], r1["transitions"])))
    prompt = torch.cat([r["prompt_ids"][r["transitions"].cond_index] for r in ranks])  # each row's prompt
    adv = torch.cat([r0["adv"], r1["adv"]])
    union = Transitions(*(prompt if name == "cond_index" else field for name, field in zip(Transitions._fields, union)))
    stats = trainer.update(union, adv, 2 * r0["n_samples"], torch.Generator().manual_seed(0), cond=trainer.cond)
    assert stats.updates == 1 == r0["metrics"]["updates"]
    assert stats.grad_norm == pytest.approx(r0["metrics"]["grad_norm"], rel=1e-4)
    assert stats.grad_norm == pytest.approx(r1["metrics"]["grad_norm"], rel=1e-4)
    for p, q in zip(trainer.params, r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-7)


def _check_chains(case: str, ranks: list[dict], global_std: bool) -> None:
    cfg = _config(case)
    raw = torch.cat([r["raw"][0] for r in ranks])  # [N_total], rank 0's leaves first
    assert not torch.equal(ranks[0]["raw"], ranks[1]["raw"])  # each rank sampled its own noise
    n_local = ranks[0]["raw"].shape[1]
    a = cfg.advantage
    sample_adv = zscore(raw, raw.numel() // cfg.rollout.group_size, a.ddof, a.eps, global_std)  # [N_total]
    for rank, r in enumerate(ranks):  # each rank trains its own rows of the global advantages
        torch.testing.assert_close(r["adv"], sample_adv[rank * n_local + r["transitions"].node], rtol=1e-4, atol=1e-5)
    _check_update(case, ranks)


def test_ranks_join_the_group_torchrun_describes(ranks):
    assert [r["joined"] for r in ranks] == [r["joined_again"] for r in ranks] == [(2, 0), (2, 1)]
    assert [r["main"] for r in ranks] == [True, False]
    assert distributed.init_from_env() == (1, 0) and distributed.is_main()  # no RANK here: no group


def test_two_ranks_match_one_process_for_chains(ranks):
    _check_chains("chains", [r["chains"] for r in ranks], global_std=False)


def test_two_ranks_match_one_process_for_global_std_chains(ranks):
    # The std is over the leaves of BOTH ranks: a per-rank std would give different advantages.
    per_rank = [r["global_std"] for r in ranks]
    _check_chains("global_std", per_rank, global_std=True)
    local = zscore(per_rank[0]["raw"][0], 2, 0, 0.0, global_std=True)
    assert not torch.allclose(per_rank[0]["adv"], local[per_rank[0]["transitions"].node], rtol=1e-3)


def test_two_ranks_match_one_process_for_trees(ranks):
    per_rank = [r["trees"] for r in ranks]
    cfg = _config("trees")
    forest = method.forest(cfg, 2)  # one tree per rank; depth d holds rank 0's nodes, then rank 1's
    local = method.forest(cfg, 1).nodes_per_depth
    leaves = torch.cat([r["raw"][0] for r in per_rank])
    log_probs = tuple(torch.cat(parts) for parts in zip(*(r["edge_log_probs"] for r in per_rank)))
    fused = tree.fuse_rewards(leaves, forest, "path", log_probs, temperature=0.5)
    want = depthwise(fused, 2, cfg.advantage.ddof, cfg.advantage.eps)  # [all nodes], depth-major
    offsets = torch.tensor([0, *forest.nodes_per_depth]).cumsum(0)
    for rank, r in enumerate(per_rank):  # rank r's node n at depth d is node r * N_d(one tree) + n of depth d
        tr = r["transitions"]
        expected = want[offsets[tr.depth] + rank * torch.tensor(local)[tr.depth] + tr.node]
        torch.testing.assert_close(r["adv"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(per_rank[0]["raw"], per_rank[1]["raw"])
    _check_update("trees", per_rank)


def test_a_nan_reward_on_one_rank_stops_every_rank(ranks):
    r0, r1 = ranks[0]["nan"], ranks[1]["nan"]
    assert "on another rank" in r0["message"] and "for prompt" in r1["message"]
    assert r0["unchanged"] and r1["unchanged"] and r0["iteration"] == r1["iteration"] == 0
