"""The trainer on a tiny download-free policy: ratio 1, window-only gradients, NaN rewards, determinism."""

from __future__ import annotations

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.training import adaptive, method
from flowgrove.training.trainer import GRPOTrainer, NonFiniteRewardError

from conftest import TinyPolicy, brightness

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000", "rewards={brightness: 1.0}"]


def make(method_name: str, *extra: str, reward=brightness) -> GRPOTrainer:
    cfg = load_config(None, SMALL + list(extra), method=method_name)
    cfg.rewards = {"brightness": 1.0}
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": reward}, ["zero", "one", "two"])


@pytest.mark.parametrize("name", ["dancegrpo", "flowgrpo", "mixgrpo", "mixgrpo-flash-star", "branchgrpo", "branchgrpo-mix",
                                  "grpo-guard", "tempflow-grpo"])
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


# ---- GRPO-Guard, TempFlow-GRPO weights and Flow-DPPO's trust region in the trainer ---------------------------------
ALL_THREE = ["train.ratio_norm=grpo_guard", "train.step_weight=tempflow", "train.trust_region=dppo"]


def _recording(monkeypatch):
    """Record every policy_loss call of the trainer (its tensors and choices)."""
    from flowgrove.training import trainer as trainer_mod

    calls, real = [], trainer_mod.policy_loss

    def policy_loss(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "policy_loss", policy_loss)
    return calls


def test_tempflow_normaliser_is_the_references_constant_on_flow_grpos_grid():
    # UniRL's TempFlowGRPO weighs a step by 2.25 * its transition std on Flow-GRPO's SD3 grid (10 steps, a = 0.7):
    # 2.25 is 1 / the mean std of the 9 trained steps, which is what flowgrove divides by
    from flowgrove.samplers.family import FLOW_STEPS

    assert 1 / method.mean_trained_std(load_config(method="flowgrpo"), FLOW_STEPS) == pytest.approx(2.25, abs=0.005)
    cfg = load_config(method="tempflow-grpo")  # a window: the mean over the positions it visits (0..7 of 10)
    sigmas = method.base_sigmas(cfg)[:9]
    g = 0.7 * torch.sqrt(sigmas[:-1] / (1 - torch.where(sigmas[:-1] >= 1, sigmas[1:], sigmas[:-1])))
    want = (g * (sigmas[:-1] - sigmas[1:]).sqrt()).mean().item()
    assert method.mean_trained_std(cfg, FLOW_STEPS) == pytest.approx(want, rel=1e-6)


def test_rollouts_keep_the_means_only_for_a_loss_term_that_reads_them():
    stored = {}
    for name, extra in (("plain", []), ("guard", ["train.ratio_norm=grpo_guard"]), ("dppo", ["train.trust_region=dppo"])):
        trainer = make("flowgrpo", *extra)
        real = trainer.update
        trainer.update = lambda tr, *a, _real=real, _name=name, **k: (stored.__setitem__(_name, tr), _real(tr, *a, **k))[1]
        metrics = trainer.step()
        assert metrics["first_ratio_max_dev"] < 1e-5
        stored[name + "_trainer"] = trainer
    assert stored["plain"].old_mean is None  # no extra latent per transition unless a term reads it
    for name in ("guard", "dppo"):
        tr = stored[name]
        assert tr.old_mean is not None and tr.old_mean.shape == tr.x.shape
    # the stored mean is the rollout policy's: re-scored at the rollout weights, the means agree
    fresh = make("flowgrpo", "train.ratio_norm=grpo_guard")
    plan = method.step_plan(fresh.cfg, 0)
    from flowgrove.training.rollout import rescore, rollout

    cond = fresh.policy.encode_prompts(["one"])
    ro = rollout(fresh.policy, cond, torch.zeros(3, dtype=torch.long), torch.randn(3, 1, 4, 4), method.rollout_spec(fresh.cfg, plan),
                 torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = rescore(fresh.policy, ro.transitions, cond, fresh.cfg.sampler.noise)[1]
    torch.testing.assert_close(mean, ro.transitions.old_mean, rtol=1e-5, atol=1e-6)


def test_the_trainer_hands_the_drift_kl_weights_and_region_to_the_loss(monkeypatch):
    # a tree (split steps drawn with 4x the std): the TempFlow weight is the step's std without the split scale over
    # the normaliser, the drift KL is the exact KL of each transition's own (scaled) std
    calls = _recording(monkeypatch)
    trainer = make("branchgrpo", "rollout.prompts_per_step=1", *ALL_THREE, "train.trust_region_kl=1e-7")
    trainer.step()
    assert calls
    saw_split = False
    for args, kwargs in calls:
        region, std, weights, drift = args[4], kwargs["std"], kwargs["weights"], kwargs["drift_kl"]
        assert region.kind == "dppo" and region.kl_bound == 1e-7 and kwargs["ratio_norm"] == "grpo_guard"
        assert drift.shape == std.shape == weights.shape and (drift >= 0).all()
        scale = std / (weights * trainer.mean_std)  # the split scale each transition was drawn with
        assert torch.allclose(scale, torch.ones_like(scale)) or torch.allclose(scale.max(), torch.tensor(4.0))
        saw_split |= bool((scale > 2).any())
    assert saw_split
    assert calls[0][1]["drift_kl"].abs().max() < 1e-10  # the first micro-batch is scored before any weight changes


@pytest.mark.parametrize("name", ["dancegrpo", "flowgrpo", "mixgrpo-flash", "branchgrpo", "flowgrove"])
def test_guard_tempflow_and_dppo_train_together_on_chains_windows_tails_and_trees(name):
    trainer = make(name, *ALL_THREE, "rollout.prompts_per_step=1" if "branch" in name or name == "flowgrove" else "train.seed=0")
    before = [p.detach().clone() for p in trainer.params]
    for _ in range(2):
        metrics = trainer.step()
        assert all(torch.isfinite(torch.tensor(float(metrics[k]))) for k in ("loss", "clip_fraction", "grad_norm"))
        assert 0 <= metrics["clip_fraction"] <= 1 and metrics["skipped_steps"] == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))


def test_dppo_leaves_only_corrective_updates_once_every_transition_is_past_the_bound(monkeypatch):
    # a bound of ~0: after the first optimizer step every moved transition is past it, so exactly the outward ones
    # (ratio > 1 with A > 0, ratio < 1 with A < 0) are masked, and the loss of the rest is -A r unclipped
    calls = _recording(monkeypatch)
    trainer = make("flowgrpo", "train.trust_region=dppo", "train.trust_region_kl=1e-30", "train.accumulate=transitions",
                   "train.accumulate_size=8", "train.micro_batch=8")
    metrics = trainer.step()
    assert metrics["updates"] > 2
    later = [(a, k) for a, k in calls[1:] if (k["drift_kl"] > 0).all()]
    assert later
    for args, kwargs in later:
        log_prob, old, adv = args[0].detach(), args[1], args[2].clamp(-5, 5)
        r = torch.exp(log_prob - old)
        outward = ((r > 1) & (adv > 0)) | ((r < 1) & (adv < 0))
        from flowgrove.grpo.losses import policy_loss

        out = policy_loss(log_prob, old, args[2], 5.0, args[4], drift_kl=kwargs["drift_kl"].detach())
        assert out.clip_fraction.item() == pytest.approx(outward.float().mean().item())
        torch.testing.assert_close(out.loss, torch.where(outward, 0.0, -adv * r).mean())


def test_one_update_per_rollout_is_the_single_update():
    # train.updates_per_rollout=1 is the update every preset ran before the key existed: the same numbers, bit for bit.
    runs = []
    for extra in ([], ["train.updates_per_rollout=1"]):
        trainer = make("branchgrpo", "rollout.prompts_per_step=1", *extra)
        metrics = {k: v for k, v in trainer.step().items() if not k.startswith("seconds_")}
        runs.append((metrics, [p.detach().clone() for p in trainer.params]))
    (plain, w_plain), (one, w_one) = runs
    assert plain == one
    assert all(torch.equal(a, b) for a, b in zip(w_plain, w_one))
    assert plain["last_pass_ratio_max_dev"] >= plain["first_ratio_max_dev"]


def test_later_passes_move_the_ratio_and_the_clip_bounds_it():
    # TreeGRPO's reuse: the second pass re-scores the rollout's transitions against the rollout's log-probs after the
    # first pass's optimizer steps, so its ratios are away from 1 and some fall outside the clip range.
    tight = ["rollout.prompts_per_step=1", "train.clip_range=1e-5"]  # the tiny policy's steps move ratios by ~1e-4
    one = make("treegrpo", *tight, "train.updates_per_rollout=1").step()
    two = make("treegrpo", *tight, "train.updates_per_rollout=2").step()
    assert two["first_ratio_max_dev"] == one["first_ratio_max_dev"] < 1e-5
    assert two["updates"] == 2 * one["updates"] and two["transitions"] == 2 * one["transitions"]
    assert two["last_pass_ratio_max_dev"] > 100 * max(one["first_ratio_max_dev"], 1e-7)
    assert two["last_pass_clip_fraction"] > 0.0 and two["last_pass_clip_fraction"] > one["last_pass_clip_fraction"]
    assert two["clip_fraction"] > one["clip_fraction"]  # the mean over both passes


def test_adaptive_tree_splits_its_extreme_nodes_within_the_call_budget(monkeypatch):
    # 111 calls per tree: m = 1, 1, 2, 3 nodes split at steps 0, 3, 6, 9 (8 leaves); 92 calls fewer than the full tree.
    trainer, seen, plain = make("branchgrpo-adaptive", "rollout.prompts_per_step=2", "tree.adaptive_calls=111"), [], adaptive.split_choice

    def recording(cfg, score, n_trees, num_steps):
        inner = plain(cfg, score, n_trees, num_steps)

        def wrapped(step, x0_pred, rows):
            fan = inner(step, x0_pred, rows)
            seen.append((step, score(x0_pred, rows), fan))
            return fan
        return wrapped

    monkeypatch.setattr(adaptive, "split_choice", recording)
    metrics = trainer.step()
    assert metrics["model_calls_saved_per_prompt"] == 203 - 111 and metrics["nfe_old"] == 111 / 8
    assert [(step, int((fan == 2).sum())) for step, _, fan in seen] == [(0, 2), (3, 2), (6, 4), (9, 6)]  # 2 trees
    _, scores, fan = seen[-1]  # step 9: 3 of each tree's 5 nodes split: its best one and worst two
    for tree_scores, tree_fan in zip(scores.reshape(2, 5), fan.reshape(2, 5)):
        order = tree_scores.argsort()
        assert tree_fan[order[:2]].tolist() == [2, 2] and tree_fan[order[-1]] == 2 and tree_fan[order[2:4]].tolist() == [1, 1]
    assert metrics["updates"] >= 1 and metrics["first_ratio_max_dev"] < 1e-5
