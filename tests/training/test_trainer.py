"""The trainer on a tiny download-free policy: ratio 1, window-only gradients, NaN rewards, determinism."""

from __future__ import annotations

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.training import method
from flowgrove.training.trainer import GRPOTrainer, NonFiniteRewardError

from conftest import TinyPolicy, brightness

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000", "rewards={brightness: 1.0}"]


def make(method_name: str, *extra: str, reward=brightness) -> GRPOTrainer:
    cfg = load_config(None, SMALL + list(extra), method=method_name)
    cfg.rewards = {"brightness": 1.0}
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": reward}, ["zero", "one", "two"])


@pytest.mark.parametrize("name", ["dancegrpo", "flowgrpo", "mixgrpo", "mixgrpo-flash-star", "branchgrpo", "branchgrpo-mix"])
def test_first_ratio_is_one_and_weights_move(name):
    trainer = make(name, "rollout.prompts_per_step=1" if name.startswith("branch") else "train.seed=0")
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.step()
    # The first micro-batch is scored before any weight changes: every ratio is 1 up to float rounding of a
    # different batch composition (bit-exact per step batch, see test_rollout).
    assert metrics["first_ratio_max_dev"] < 1e-5
    assert metrics["transitions"] > 0 and metrics["updates"] >= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))


def test_gradients_come_only_from_window_steps():
    # MixGRPO: record the sigmas the model sees while autograd records; they must be the window's sigmas.
    trainer = make("mixgrpo", "window.start=5", "window.interval=1000")
    seen: list[float] = []
    hook = trainer.policy.module.register_forward_hook(
        lambda mod, args, out: seen.extend(args[1].tolist()) if torch.is_grad_enabled() else None
    )
    trainer.step()
    hook.remove()
    plan = method.step_plan(trainer.cfg, 0)
    window = {plan.sigmas[i].item() for i in range(5, 9)}
    assert plan.trained_steps == (5, 6, 7, 8)
    assert seen and set(seen) <= window
    assert set(seen) == window


def test_nan_reward_stops_the_step_without_touching_weights():
    def broken(images, prompts):
        r = images.mean(dim=(1, 2, 3))
        r[1] = float("nan")
        return r

    trainer = make("dancegrpo", reward=broken)
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(NonFiniteRewardError, match="brightness.*NaN/inf.*no weights changed"):
        trainer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params))
    assert trainer.iteration == 0


def test_same_seed_same_metrics():
    a, b = make("dancegrpo"), make("dancegrpo")
    for _ in range(2):
        ma, mb = a.step(), b.step()
        assert {k: v for k, v in ma.items() if not k.startswith("seconds")} == {
            k: v for k, v in mb.items() if not k.startswith("seconds")
        }


def test_nfe_accounting_matches_the_plans():
    # dancegrpo: T = 16 model calls per sample, int(15 * 0.6) = 9 recomputed transitions per sample.
    m = make("dancegrpo").step()
    assert (m["nfe_old"], m["nfe_new"]) == (16.0, 9.0)
    # mixgrpo-flash-star: window 0..3 + DPM tail: int((25 - 3) * 0.2) = 4 points would leave log-SNR steps of 2.4, so
    # the log-SNR tail takes 6 points (steps <= MAX_LOGSNR_STEP) -> 4 + 5 = 9 calls; 4 trained.
    m = make("mixgrpo-flash-star").step()
    assert (m["nfe_old"], m["nfe_new"]) == (9.0, 4.0)
    # branchgrpo: 203 calls / 16 leaves per tree; x0_pred image: 218 - 16 = 202 sampled edges / 16 leaves.
    m = make("branchgrpo", "rollout.prompts_per_step=1").step()
    assert (m["nfe_old"], m["nfe_new"]) == (203 / 16, 202 / 16)
    # branchgrpo-mix: SDE at {0,1,2,3} | {0,3,6,9}: edges 2 + 2 + 2 + 4 + 8 + 16 = 34 per tree.
    m = make("branchgrpo-mix", "rollout.prompts_per_step=1").step()
    assert m["nfe_new"] == 34 / 16


def test_depth_pruning_removes_edges():
    full = make("branchgrpo", "rollout.prompts_per_step=1").step()["transitions"]
    pruned = make("branchgrpo-deppru", "rollout.prompts_per_step=1").step()["transitions"]
    assert full - pruned == 5 * 16  # child depths 15..19, 16 nodes each
    width = make("branchgrpo-widpru", "rollout.prompts_per_step=1").step()["transitions"]
    # after the last split (step 9) the 16 chains have steps 10..18 sampled (x0_pred image): keep 8 of 16 chains
    assert full - width == 8 * 9


def test_group_prefix_sharing_lowers_measured_calls():
    # dancegrpo: the group's shared initial noise makes the first model call common to its G = 4 members.
    m = make("dancegrpo").step()
    assert m["model_calls_per_sample"] == 15 + 1 / 4
    m = make("mixgrpo", "window.start=5", "window.interval=1000").step()
    assert m["model_calls_per_sample"] == 25 - 6 + 6 / 4  # steps 0..5 computed once per group of 4


def test_tree_with_compressed_tail():
    # flowgrove preset: SDE at {0,1,2,3} | {0,3,6,9}; after step 9 the 11 Euler steps become int(11 * 0.7) = 7 grid
    # points, 6 DPM steps: 16 steps. Calls per tree: 1 + 2*3 + 4*3 + 8*3 + 16*(1 + 6) = 139; trained edges 34.
    trainer = make("flowgrove", "rollout.prompts_per_step=1")
    m = trainer.step()
    assert m["nfe_old"] == 139 / 16 and m["model_calls_per_sample"] == 139 / 16
    assert m["nfe_new"] == 34 / 16
    plan = method.step_plan(trainer.cfg, 0)
    assert plan.kinds[9:] == ("sde",) + ("dpm",) * 6 and plan.sigmas[-1] == 0


@pytest.mark.parametrize("fusion", ["path", "local"])
def test_tree_fusion_modes_and_transition_accumulation(fusion):
    trainer = make("branchgrpo", "rollout.prompts_per_step=1", f"tree.fusion={fusion}", "train.accumulate=transitions",
                   "train.accumulate_size=12")
    m = trainer.step()
    # the reference grouping: an optimizer step per 12 transitions -> ceil(202 / 12) = 17 steps per rollout
    assert m["updates"] == 17 and m["transitions"] == 202


def test_kl_penalty_and_ema():
    trainer = make("flowgrpo", "train.kl_beta=0.01", "train.ema_decay=0.9")
    first = trainer.step()
    assert first["kl"] == 0.0 or first["kl"] < 1e-8  # the first micro-batch still has the reference weights
    second = trainer.step()
    assert second["kl"] > 0
    # EMA moved towards the weights but not onto them
    assert any(not torch.equal(e, p) for e, p in zip(trainer.ema, trainer.params))
