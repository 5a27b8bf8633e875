"""Two gloo ranks against one process of the same global batch, through torch's engines (real processes).

``rollout.prompts_per_step`` is the global batch: each rank rolls out its contiguous share with its rows of the
global noise, rewards are gathered, advantages computed once, and DDP / FSDP2 average the gradients. So a 2-rank
run must equal a single-process run of the same config step for step: the metrics, and the full weights.

Tolerance: the ranks reduce gradients in a different order than one process sums them (float32), and Adam
divides by sqrt(v); over 3 steps at lr 1e-3 the weights agree to rtol 1e-4 / atol 1e-6 and the metrics to rtol
1e-4 / atol 1e-5 (the PPO loss of the first micro-batch is a mean of advantages that cancel to about 1e-6).
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

from flowgrove.config.load import load_config
from flowgrove.parallel import distributed, engine

# One AdamW step per rollout. A large Adam eps and no clipping make the step size depend on the gradient's scale,
# so summed instead of averaged gradients change the weights (Adam alone is scale-invariant).
COMMON = ["rewards={brightness: 1.0}", "train.accumulate=transitions", "train.accumulate_size=100000",
          "train.adam_eps=1.0e-4", "train.max_grad_norm=0", "train.lr=1.0e-3", "run.progress=false"]
DIGITS = ["sampler.num_steps=4", "eval.num_steps=2", "train.micro_batch=3"]  # several micro-batches per update
STEPS = 3
# case -> (method, policy, overrides, the engine a 2-rank run picks)
CASES = {
    "fsdp_chains": ("dancegrpo", "digits", ["rollout.prompts_per_step=2", "rollout.group_size=4", *DIGITS], "fsdp"),
    "fsdp_trees": ("branchgrpo", "tiny", ["rollout.prompts_per_step=2", "tree.fusion=path", "tree.temperature=0.5",
                                           "train.micro_batch=100000"], "fsdp"),
    "ddp_lora_chains": ("flowgrpo", "digits", ["rollout.prompts_per_step=2", "rollout.group_size=4", "policy.lora_rank=4",
                                               "advantage.kind=group_global_std", "advantage.ddof=0", "train.first_k=0", *DIGITS], "ddp"),
    # one tree on two ranks: both roll it out, each trains half of its transitions. With the reference's loss scale
    # (sum / (G * N-bar)) the gradient's size depends on N-bar, which grad_norm checks (Adam itself is scale-free here)
    "tree_spans_ranks": ("branchgrpo", "tiny", ["rollout.prompts_per_step=1", "tree.fusion=path", "tree.temperature=0.5",
                                                "train.loss_scale=reference", "train.adam_eps=1.0e-10",
                                                "train.micro_batch=100000"], "fsdp"),
    # EMA and the KL reference are copies of FSDP2's shards; the KL forward swaps them into the sharded weights
    "fsdp_ema_kl": ("dancegrpo", "tiny", ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.ema_decay=0.5",
                                          "train.kl_beta=0.5", "train.micro_batch=5"], "fsdp"),
    # one prompt's group of 6 is split 3 + 3 over the two ranks: its statistics still cover all six
    "group_spans_ranks": ("dancegrpo", "tiny", ["rollout.prompts_per_step=1", "rollout.group_size=6",
                                                "train.micro_batch=100000"], "fsdp"),
    # Flow-GRPO's filter: "zero" and "one" tie (TIED), so in every step one rank's group is dropped; that rank pads
    # with its dead rows (forwards, zero backwards), and the loss divides by the live rows of both ranks, the
    # KL included, as one process does
    "drop_zero_advantage": ("flowgrpo", "tied", ["rollout.prompts_per_step=2", "rollout.group_size=4",
                                                 "train.drop_zero_advantage=true", "train.first_k=0",
                                                 "train.kl_beta=0.5", *DIGITS], "fsdp"),
    # forward objectives: each rank noises its samples with its rows of the global draws of times and noise
    "forward_nft_kl": ("diffusionnft", "tiny", ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.kl_beta=0.5",
                                                "train.micro_batch=5"], "fsdp"),
    "forward_awm_group_spans_ranks": ("awm", "tiny", ["rollout.prompts_per_step=1", "rollout.group_size=6",
                                                      "train.micro_batch=100000"], "fsdp"),
}
# run.offload=params: FSDP2's CPUOffloadPolicy on the same config as the case named (on the CPU the shards are
# already there, so the policy is applied but moves nothing: the training must be that of the case)
OFFLOADED = {"fsdp_chains_offload": "fsdp_chains"}
TIED = ("zero", "one")  # the prompts drawn: step 0 four | zero, step 1 one | three, step 2 zero | four
PROMPTS = ["zero", "one", "two", "three", "four"]
METRICS = ("reward_mean", "reward_std", "loss", "clip_fraction", "approx_kl", "grad_norm", "updates", "transitions",
           "dropped_transitions", "kl")


def _tied(images, prompts):
    """Brightness, but every image of a TIED prompt scores 0.5: that group's advantages are exactly 0."""
    from conftest import brightness

    tie = torch.tensor([p in TIED for p in prompts])
    return torch.where(tie, torch.full((len(prompts),), 0.5), brightness(images, prompts))


def _case(case: str) -> tuple:
    if case in OFFLOADED:
        name, policy, extra, kind = CASES[OFFLOADED[case]]
        return name, policy, [*extra, "run.offload=params"], kind
    return CASES[case]


def _trainer(case: str):
    from conftest import TinyPolicy, brightness

    from flowgrove.training.setup import build_trainer
    from flowgrove.training.trainer import GRPOTrainer

    name, policy, extra, _ = _case(case)
    cfg = load_config(None, COMMON + extra, method=name)
    cfg.rewards = {"brightness": 1.0}
    if policy == "digits":
        return build_trainer(cfg)
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": _tied if policy == "tied" else brightness}, PROMPTS)


def _run(case: str) -> dict:
    """``STEPS`` steps: the metrics of each and the full weights after them (gathered from FSDP2's shards)."""
    torch.manual_seed(0)
    trainer = _trainer(case)
    metrics = [trainer.step() for _ in range(STEPS)]
    params = [engine.full_value(p.detach()).clone() for p in trainer.params]
    params += [engine.full_value(e).clone() for e in trainer.ema or []]  # the EMA must match as well
    return {"metrics": metrics, "params": params, "engine": trainer.engine.kind, "n_trainable": len(trainer.params),
            "copies_sharded": [type(e).__name__ for e in (trainer.ema or []) + (trainer.reference or [])],
            "sharded": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.params),
            "offload": _offload_policies(trainer.engine.module)}


def _offload_policies(module) -> dict:
    """The offload policy of every FSDP2 unit, and the devices of the parameters' local shards."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    groups = [m._get_fsdp_state()._fsdp_param_group for m in units]
    return {"policies": sorted({type(g.offload_policy).__name__ for g in groups if g is not None}),
            "to_cpu": sorted({fp.offload_to_cpu for g in groups if g is not None for fp in g.fsdp_params}),
            "devices": sorted({str(p.to_local().device) for p in module.parameters() if hasattr(p, "to_local")})}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    results = {"joined": distributed.init_from_env(), "main": distributed.is_main()}  # the torchrun environment
    results["joined_again"] = distributed.init_from_env()  # a second call keeps the group
    results.update({case: _run(case) for case in [*CASES, *OFFLOADED]})
    results["reductions"] = [_ddp_reductions(micro_batch) for micro_batch in (100000, 3)]
    results["nan"] = _bad_reward_on_rank_one(rank, "nan")
    results["raises"] = _bad_reward_on_rank_one(rank, "raises")
    torch.save(results, f"{out}/rank{rank}.pt")
    from conftest import end_worker

    end_worker()  # instead of destroy_process_group: see conftest.end_worker


def _ddp_reductions(micro_batch: int) -> tuple[int, int]:
    """(DDP bucket reductions, optimizer steps) of one step of the DDP case with ``micro_batch``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    trainer = _trainer("ddp_lora_chains")
    trainer.cfg.train.micro_batch = micro_batch
    calls = []

    def counting(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)

    trainer.engine.ddp.register_comm_hook(None, counting)
    trainer.step()
    return len(calls), trainer.optimizer_steps()


def _bad_reward_on_rank_one(rank: int, kind: str) -> dict:
    """A reward that is NaN (``kind`` "nan") or raises ("raises") on rank 1 only: both ranks must stop the step (no
    rank left waiting in a collective), each with its own message."""
    from conftest import TinyPolicy, brightness

    from flowgrove.training.trainer import GRPOTrainer, TrainingHalted

    def reward(images, prompts):
        if rank == 1 and kind == "raises":
            raise RuntimeError("the reward server is gone")
        return brightness(images, prompts) * (float("nan") if rank == 1 else 1.0)

    cfg = load_config(None, COMMON + ["rollout.prompts_per_step=2", "rollout.group_size=4"], method="dancegrpo")
    cfg.rewards = {"brightness": 1.0}
    trainer = GRPOTrainer(cfg, TinyPolicy(), {"brightness": reward}, PROMPTS)
    before = [engine.full_value(p.detach()).clone() for p in trainer.params]
    try:
        trainer.step()
    except TrainingHalted as err:
        message, error = str(err), type(err).__name__
    else:
        message, error = "", ""
    unchanged = all(torch.equal(b, engine.full_value(p.detach())) for b, p in zip(before, trainer.params))
    return {"message": message, "error": error, "unchanged": unchanged, "iteration": trainer.iteration}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_ranks_join_the_group_torchrun_describes(ranks):
    assert [r["joined"] for r in ranks] == [r["joined_again"] for r in ranks] == [(2, 0), (2, 1)]
    assert [r["main"] for r in ranks] == [True, False]
    assert distributed.init_from_env() == (1, 0) and distributed.is_main()  # no RANK here: no group


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_of_the_same_global_batch(ranks, case):
    one = _run(case)
    assert one["engine"] == "none" and [r[case]["engine"] for r in ranks] == [CASES[case][3]] * 2
    for r in ranks:
        for step, (got, want) in enumerate(zip(r[case]["metrics"], one["metrics"])):
            bad = {key: (got[key], want[key]) for key in METRICS if got[key] != pytest.approx(want[key], rel=1e-4, abs=1e-5)}
            assert not bad, (case, step, bad)
        for p, q in zip(r[case]["params"], one["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    moved = [(p - q).abs().max().item() for p, q in zip(one["params"], _initial(case))]
    assert max(moved) > 1e-4  # the weights did change: the equality is not that of two untouched models


@pytest.mark.parametrize("case", list(OFFLOADED))
def test_cpu_offload_is_applied_and_trains_as_without_it(ranks, case):
    for r in ranks:
        on, off = r[case], r[OFFLOADED[case]]
        assert on["engine"] == off["engine"] == "fsdp"
        assert on["offload"] == {"policies": ["CPUOffloadPolicy"], "to_cpu": [True], "devices": ["cpu"]}
        assert off["offload"]["policies"] == ["OffloadPolicy"] and off["offload"]["to_cpu"] == [False]
        timeless = [[{k: v for k, v in m.items() if not k.startswith("seconds")} for m in r] for r in (on["metrics"], off["metrics"])]
        assert timeless[0] == timeless[1]
        for p, q in zip(on["params"], off["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def _initial(case: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().clone() for p in _trainer(case).params]


def test_ddp_reduces_once_per_accumulation_group_not_per_micro_batch(ranks):
    (one_micro, steps_a), (many_micro, steps_b) = ranks[0]["reductions"]
    assert steps_a == steps_b == 1 and one_micro >= 1
    assert many_micro == one_micro  # 6 micro-batches of 3 rows, yet only the last one's backward reduced


def test_fsdp2_ema_and_kl_reference_are_sharded_like_the_weights(ranks):
    kinds = ranks[0]["fsdp_ema_kl"]["copies_sharded"]
    assert kinds and set(kinds) == {"DTensor"}


def test_fsdp2_shards_the_weights_and_ddp_replicates_them(ranks):
    for case, (_, _, _, engine) in CASES.items():
        full = sum(p.numel() for p in ranks[0][case]["params"][:ranks[0][case]["n_trainable"]])
        local = [r[case]["sharded"] for r in ranks]
        if engine == "fsdp":  # each rank holds about half (shards are padded to equal sizes)
            assert all(n < 0.75 * full for n in local) and sum(local) >= full, (case, local, full)
        else:
            assert local == [full, full], (case, local, full)


def test_a_nan_reward_on_one_rank_stops_every_rank(ranks):
    r0, r1 = ranks[0]["nan"], ranks[1]["nan"]
    assert "on another rank" in r0["message"] and "for prompt" in r1["message"]
    assert r0["error"] == r1["error"] == "NonFiniteRewardError"
    assert r0["unchanged"] and r1["unchanged"] and r0["iteration"] == r1["iteration"] == 0


def test_a_reward_that_raises_on_one_rank_stops_every_rank(ranks):
    r0, r1 = ranks[0]["raises"], ranks[1]["raises"]
    assert r0["message"].startswith("a reward failed on another rank at step 1; the step was skipped")
    assert r1["message"].startswith("reward 'brightness' failed (RuntimeError: the reward server is gone) at step 1")
    assert r0["error"] == r1["error"] == "RewardFailedError"
    assert r0["unchanged"] and r1["unchanged"] and r0["iteration"] == r1["iteration"] == 0


def test_each_rank_drops_its_own_tied_group(ranks):
    # every step draws one tied and one untied prompt (TIED): 4 images x 4 steps dropped on one rank, trained on the other
    for r in ranks:
        assert [m["dropped_transitions"] for m in r["drop_zero_advantage"]["metrics"]] == [16] * STEPS
        assert [m["transitions"] for m in r["drop_zero_advantage"]["metrics"]] == [16] * STEPS
