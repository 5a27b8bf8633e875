"""Scout rollouts (rollout.scouts): the best and worst of each group's candidate noises, by a cheap ODE pass, start
the group's chains; off, nothing changes."""

from __future__ import annotations

import pytest
import torch

from flowgrove.cli import main
from flowgrove.config.load import load_config
from flowgrove.training import scouts, trainer as trainer_module
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy, brightness

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000", "rewards={brightness: 1.0}"]


def _make(*extra: str) -> GRPOTrainer:
    cfg = load_config(None, SMALL + list(extra), method="flowgrpo")
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, ["zero", "one", "two"])


def test_pick_extremes_takes_each_groups_best_and_worst_by_hand():
    # two groups of 2 chains, 3 candidates per chain: 6 candidates per group
    totals = torch.tensor([0.5, 0.9, 0.1, 0.4, 0.3, 0.7,  # group 0: best 0.9, worst 0.1
                           0.2, 0.6, 0.8, 0.0, 0.5, 0.55])  # group 1: best 0.8, worst 0.0
    roots = torch.tensor([0] * 6 + [1] * 6)
    keep = scouts.pick_extremes(totals, roots, 3)
    assert keep.nonzero().flatten().tolist() == [1, 2, 8, 9]
    # 4 chains of one group from 8 candidates: the 2 best and 2 worst; a group on two ranks picks within each part
    keep = scouts.pick_extremes(torch.tensor([5., 1., 7., 3., 2., 8., 4., 6.]), torch.zeros(8, dtype=torch.long), 2)
    assert keep.nonzero().flatten().tolist() == [1, 2, 4, 5]
    # an odd group: one more worst than best (as a tree's width pruning)
    keep = scouts.pick_extremes(torch.tensor([3., 1., 2., 6., 5., 4.]), torch.zeros(6, dtype=torch.long), 2)
    assert keep.nonzero().flatten().tolist() == [1, 2, 3]


def test_scouts_start_each_group_from_its_extreme_candidates(monkeypatch):
    seen = {}
    pick, roll = scouts.pick_extremes, trainer_module.rollout

    def spy_pick(totals, roots, s):
        seen["totals"], seen["roots"], seen["keep"] = totals, roots, pick(totals, roots, s)
        return seen["keep"]

    def spy_rollout(policy, cond, cond_index, x_init, *args, **kwargs):
        seen["x_init"] = x_init
        return roll(policy, cond, cond_index, x_init, *args, **kwargs)

    monkeypatch.setattr(scouts, "pick_extremes", spy_pick)
    monkeypatch.setattr(trainer_module, "rollout", spy_rollout)
    trainer = _make("rollout.scouts=3", "rollout.scout_steps=2")
    share = trainer_module.rank_share.rank_share(trainer.cfg, 1, 0)
    candidates = scouts.candidate_noise(trainer.cfg, trainer.policy.latent_shape, share,
                                        trainer_module.step_generator(0, 0, 1))  # the step's noise stream, first draw
    metrics = trainer.step()
    assert seen["totals"].shape == (24,) and seen["roots"].tolist() == [0] * 12 + [1] * 12
    torch.testing.assert_close(seen["x_init"], candidates[seen["keep"]], rtol=0, atol=0)
    for g in range(2):  # each group's chains start from its 2 best and 2 worst candidates
        t, chosen = seen["totals"][12 * g:12 * g + 12], seen["keep"][12 * g:12 * g + 12]
        order = torch.argsort(t)
        assert set(chosen.nonzero().flatten().tolist()) == set(order[:2].tolist()) | set(order[-2:].tolist())
    assert metrics["model_calls_per_sample"] == pytest.approx(trainer.cfg.sampler.num_steps + 3 * 2)


def test_scouts_off_draws_what_it_drew_before():
    a, b = _make(), _make("rollout.scouts=1", "rollout.scout_steps=7")
    ma, mb = a.step(), b.step()
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith("seconds")}  # noqa: E731
    assert drop(ma) == drop(mb)
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))


@pytest.mark.parametrize("extra, words", [
    (["--method", "dancegrpo", "rollout.scouts=2"], ["rollout.scouts=2", "rollout.same_noise_in_group=false"]),
    (["--method", "branchgrpo", "rollout.scouts=2"], ["rollout.scouts=2", "tree", "rollout.scouts=1"]),
])
def test_scouts_refuse_shared_noise_in_one_line(extra, words, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
