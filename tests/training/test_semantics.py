"""Semantics that must not go silently wrong: reward weights as given, non-finite updates skipped, prompts drawn
without replacement, the EMA schedules, the parity switches (KL scale, split-edge std, loss scale)."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrove.config.load import AdvantageConfig, load_config
from flowgrove.grpo import advantages, selection
from flowgrove.grpo.losses import ema_decay, kl_std, loss_weight
from flowgrove.training import credit, method, trainer as trainer_mod
from flowgrove.training.rollout import Transitions
from flowgrove.training.trainer import GRPOTrainer, NonFiniteUpdatesError

from conftest import TinyPolicy, brightness, free_port, restore_checkpoint

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000"]


def make(method_name: str, *extra: str, rewards=None, prompts=("zero", "one", "two")) -> GRPOTrainer:
    rewards = rewards or {"brightness": (brightness, 1.0)}
    cfg = load_config(None, SMALL + list(extra), method=method_name)
    cfg.rewards = {name: w for name, (_, w) in rewards.items()}
    return GRPOTrainer(cfg, TinyPolicy(), {name: fn for name, (fn, _) in rewards.items()}, list(prompts))


# ---- 1. reward weights are used as given ------------------------------------------------------------------------
def test_negative_weight_penalises_its_reward_in_chain_and_tree_advantages():
    # r0 rises along the samples and r1 rises faster: with weights (1, -2) the total r0 - 2 r1 FALLS, so the
    # advantages must fall too (the old code divided by the signed sum -1 and trained the opposite way).
    r0 = torch.linspace(0, 1, 8)
    rewards = torch.stack([r0, 2 * r0])  # [K=2, N=8]
    group = torch.zeros(8, dtype=torch.long)
    for aggregate in ("reward", "advantage"):
        adv = credit.chain_advantages(rewards, torch.tensor([1.0, -2.0]), group, AdvantageConfig(aggregate=aggregate))
        assert (adv.diff() < 0).all(), aggregate
        assert torch.allclose(adv, -advantages.group_zscore(r0, group), atol=1e-5) or aggregate == "advantage"


def test_weights_are_not_renormalised():
    # advantage aggregation with weights (1, 1) is twice the one with (0.5, 0.5): the weights are taken as given
    rewards = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    group = torch.arange(8) // 4
    cfg = AdvantageConfig(aggregate="advantage")
    one = credit.chain_advantages(rewards, torch.tensor([1.0, 1.0]), group, cfg)
    half = credit.chain_advantages(rewards, torch.tensor([0.5, 0.5]), group, cfg)
    assert torch.allclose(one, 2 * half)
    assert torch.allclose(trainer_mod.weighted_total(rewards, torch.tensor([1.0, -2.0])), rewards[0] - 2 * rewards[1])


def test_a_training_step_with_a_penalty_weight_lowers_the_penalised_reward_direction():
    # brightness weighted -1: the reported total is minus the brightness, the advantage favours dark samples
    t = make("dancegrpo", rewards={"brightness": (brightness, -1.0)})
    metrics = t.step()
    assert metrics["reward_mean"] == pytest.approx(-metrics["reward/brightness"])


# ---- 2. non-finite updates ----------------------------------------------------------------------------------------
def _nan_from_step(monkeypatch, first_bad_call: int) -> None:
    """Every training forward from call ``first_bad_call`` on returns a NaN log-prob."""
    calls = {"n": 0}
    real = trainer_mod.rescore_step

    def rescore_step(policy, batch, cond, *args):
        out = real(policy, batch, cond, *args)
        calls["n"] += 1
        return out._replace(log_prob=out.log_prob * float("nan")) if calls["n"] >= first_bad_call else out

    monkeypatch.setattr(trainer_mod, "rescore_step", rescore_step)


def test_nonfinite_loss_skips_the_optimizer_step_and_is_counted(monkeypatch):
    t = make("dancegrpo", "train.max_nonfinite_skips=1000", "train.ema_decay=0.9")
    _nan_from_step(monkeypatch, 1)
    before = [p.detach().clone() for p in t.params]
    ema_before = [e.clone() for e in t.ema]
    metrics = t.step()
    assert metrics["skipped_steps"] >= 1 and metrics["updates"] == 0
    assert all(torch.equal(b, p) for b, p in zip(before, t.params))  # no weight changed
    assert all(torch.equal(b, e) for b, e in zip(ema_before, t.ema))  # nor the EMA
    assert t.optimizer_steps() == 0 and not t.optimizer.state  # nor Adam's moments
    assert all(torch.isfinite(p).all() for p in t.params)


def test_consecutive_skips_stop_the_run_with_the_metrics_of_the_step(monkeypatch):
    t = make("dancegrpo", "train.max_nonfinite_skips=2", "train.accumulate_size=4")  # 2 optimizer steps per rollout
    t.step()  # a good step resets nothing yet
    assert t.nonfinite_streak == 0
    _nan_from_step(monkeypatch, 1)
    with pytest.raises(NonFiniteUpdatesError, match="2 consecutive optimizer steps.*train.max_nonfinite_skips=2") as err:
        t.step()
    assert err.value.metrics["skipped_steps"] == 2 and err.value.metrics["step"] == 2
    assert t.iteration == 2  # the step completed (nothing changed), so the state is consistent for a checkpoint


def test_a_good_step_resets_the_skip_streak(monkeypatch):
    t = make("dancegrpo", "train.max_nonfinite_skips=5", "train.accumulate_size=4")
    calls = {"n": 0}
    real = trainer_mod.rescore_step

    def rescore_step(policy, batch, cond, *args):  # the first optimizer step of each rollout is NaN, the second is fine
        out = real(policy, batch, cond, *args)
        calls["n"] += 1
        return out._replace(log_prob=out.log_prob * float("nan")) if calls["n"] % 2 == 1 else out

    monkeypatch.setattr(trainer_mod, "rescore_step", rescore_step)
    for _ in range(3):
        metrics = t.step()
        assert metrics["skipped_steps"] == 1 and metrics["updates"] == 1
    assert t.nonfinite_streak == 0 and math.isfinite(metrics["grad_norm"])


# ---- 4. prompts without replacement ------------------------------------------------------------------------------
def test_prompts_per_step_never_repeat_within_an_epoch():
    # 10 prompts, 8 per step: each step's prompts are distinct, each epoch is a fresh permutation
    draws = [selection.epoch_draws(10, step, 8, seed=3) for step in range(50)]
    assert all(len(set(d.tolist())) == 8 for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 40  # reshuffled per epoch
    # 3 per step from 9 prompts: three steps form one epoch that covers every prompt exactly once
    for epoch in range(4):
        seen = torch.cat([selection.epoch_draws(9, 3 * epoch + k, 3, seed=1) for k in range(3)])
        assert sorted(seen.tolist()) == list(range(9))
    # more per step than prompts: every prompt is used as evenly as possible
    big = selection.epoch_draws(3, 0, 7, seed=0)
    assert torch.bincount(big, minlength=3).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    assert torch.equal(selection.epoch_draws(10, 7, 8, 5), selection.epoch_draws(10, 7, 8, 5))  # pure: resumable


def test_trainer_draws_distinct_prompts_per_step():
    seen = []
    t = make("dancegrpo", "rollout.prompts_per_step=3", "train.micro_batch=1000", prompts=[f"p{i}" for i in range(6)])
    real = t.rows

    class Recording:  # the step's prompt rows are fetched once per step, in draw order
        def rows(self, ids):
            seen.append(ids.tolist())
            return real.rows(ids)

    t.rows = Recording()
    for _ in range(4):
        t.step()
    assert all(len(set(s)) == 3 for s in seen)
    assert sorted(seen[0] + seen[1]) == list(range(6)) and sorted(seen[2] + seen[3]) == list(range(6))


# ---- 6. parity switches --------------------------------------------------------------------------------------------
def test_ema_schedules():
    assert [ema_decay("update", 0.9, s, False) for s in (1, 2)] == [0.9, 0.9]
    assert ema_decay("update", 0.9, 3, True) is None
    assert ema_decay("dancegrpo", 0.995, 5, False) is None and ema_decay("dancegrpo", 0.995, 5, True) == 0.995
    # Flow-GRPO: every 8 optimizer steps, decay min((1+s)/(10+s), 0.9)
    got = {s: ema_decay("flowgrpo", 0.9, s, False) for s in range(1, 200)}
    assert {s for s, d in got.items() if d is not None} == {s for s in range(1, 200) if (s + 1) % 8 == 0}
    assert got[7] == pytest.approx(8 / 17) and got[191] == 0.9


def test_ema_schedule_dancegrpo_moves_once_per_rollout():
    t = make("dancegrpo", "train.ema_decay=0.5", "train.ema_schedule=dancegrpo", "train.accumulate_size=2")
    ema0 = [e.clone() for e in t.ema]
    metrics = t.step()
    assert metrics["updates"] == 4
    for e0, e, p in zip(ema0, t.ema, t.params):  # one lerp by 1 - decay towards the final weights
        assert torch.allclose(e, e0 + 0.5 * (p.detach() - e0), atol=1e-6)


def test_kl_scale_reference_is_exact_kl_times_dsigma():
    g = torch.tensor([0.5, 0.7])
    sigma, sigma_next = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.2])
    x = torch.zeros(2, 1, 2, 2)
    batch = Transitions(x, x, sigma, sigma_next, g, torch.ones(2), torch.zeros(2), torch.zeros(2, dtype=torch.long),
                        torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    mean, ref = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    transition_std = batch.noise_scale * batch.g * (batch.sigma - batch.sigma_next).sqrt()
    exact = trainer_mod.transition_kl(mean, ref, kl_std("exact", transition_std, batch.g))
    reference = trainer_mod.transition_kl(mean, ref, kl_std("reference", transition_std, batch.g))
    assert torch.allclose(reference, exact * (sigma - sigma_next))
    assert torch.allclose(reference, ((mean - ref) ** 2 / (2 * g.view(-1, 1, 1, 1) ** 2)).mean(dim=(1, 2, 3)))


def test_loss_scale_reference_divides_the_group_sum_by_g_times_edges_per_root():
    assert loss_weight("mean", 3, 12, 1, 12, 218) == pytest.approx(0.25)
    assert loss_weight("reference", 3, 12, 1, 12, 218) == pytest.approx(3 / (12 * 218))
    # chains with G samples of K transitions each: the reference scale equals the mean (DanceGRPO's 1/(G*K))
    assert loss_weight("reference", 9, 36, 1, 4, 9) == pytest.approx(loss_weight("mean", 9, 36, 1, 4, 9))
    # two ranks, 3 of the group's 10 live transitions here: 3 * 2 / 10, halved again by the data-parallel mean
    assert loss_weight("mean", 3, 10, 2, 6, 9) == pytest.approx(0.6)


def test_split_logprob_std_reference_scores_split_children_with_the_unscaled_std():
    drawn = make("branchgrpo", "rollout.prompts_per_step=1", "train.steps=1")
    ref = make("branchgrpo", "rollout.prompts_per_step=1", "tree.split_logprob_std=reference")
    outs = []
    for t in (drawn, ref):
        stored = {}
        real = t.update

        def update(tr, adv, n, gen, _real=real, _stored=stored, **kwargs):
            _stored["tr"] = tr
            return _real(tr, adv, n, gen, **kwargs)

        t.update = update
        t.step()
        outs.append(stored["tr"])
    a, b = outs
    assert torch.equal(a.x_next, b.x_next)  # the same samples are drawn
    split = a.noise_scale > 1
    assert split.any() and (b.noise_scale == 1).all()
    # unscaled std on split edges: log N(x; mu, s^2) - log N(x; mu, (4s)^2) = log 4 - (1 - 1/16) z^2 / 2 per dim,
    # and with z ~ N(0, 16) under the unscaled std the reference's split log-probs are much lower
    assert (b.old_log_prob[split] < a.old_log_prob[split]).all()
    assert torch.allclose(b.old_log_prob[~split], a.old_log_prob[~split])


def _nan_on_one_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    import sys
    from pathlib import Path

    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from flowgrove.parallel import distributed
    from flowgrove.training import trainer as tmod

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    real, calls = tmod.policy_loss, {"n": 0}

    def loss_inf_on_rank1_first_call(*args, **kwargs):  # a non-finite loss with finite gradients, on rank 1 only
        out = real(*args, **kwargs)
        calls["n"] += 1
        return out._replace(loss=out.loss + float("inf")) if rank == 1 and calls["n"] == 1 else out

    tmod.policy_loss = loss_inf_on_rank1_first_call
    t = make("dancegrpo", "train.accumulate_size=4", "run.parallel=ddp", prompts=["zero", "one", "two", "three"])
    metrics = t.step()
    flat = torch.cat([p.detach().flatten() for p in t.params])[None]
    gathered = distributed.all_gather_cat(flat)
    torch.save({"skipped": metrics["skipped_steps"], "updates": metrics["updates"],
                "equal": bool(torch.equal(gathered[0], gathered[1]))}, f"{out}/rank{rank}.pt")
    from conftest import end_worker

    end_worker()  # instead of destroy_process_group: see conftest.end_worker


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):

    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_nan_on_one_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["skipped"] == r1["skipped"] == 1  # rank 0's loss was finite, yet it skipped with rank 1
    assert r0["updates"] == r1["updates"] == 1
    assert r0["equal"] and r1["equal"]  # the ranks still hold identical weights


def test_weights_that_sum_to_zero_are_a_valid_set_and_all_zero_is_not():
    from flowgrove.config.load import ConfigError

    cfg = load_config(None, ["rewards={digit_classifier: 1.0, boldness: -1.0}"])
    assert cfg.rewards == {"digit_classifier": 1.0, "boldness": -1.0}  # replaces the preset's set, kept as given
    with pytest.raises(ConfigError, match="every weight in rewards"):
        load_config(None, ["rewards={digit_classifier: 0, boldness: 0}"])


def test_the_skip_streak_survives_a_checkpoint(tmp_path, monkeypatch):
    from flowgrove.runs.checkpoint import save_checkpoint

    t = make("dancegrpo", "train.max_nonfinite_skips=1000", "train.accumulate_size=4")
    _nan_from_step(monkeypatch, 1)
    t.step()
    assert t.nonfinite_streak == 2
    path = save_checkpoint(t.state(), tmp_path, "method: dancegrpo\n")
    fresh = make("dancegrpo", "train.max_nonfinite_skips=1000", "train.accumulate_size=4")
    restore_checkpoint(fresh, path)
    assert fresh.nonfinite_streak == 2 and fresh.iteration == 1


def test_the_kl_term_uses_the_transition_std_of_each_stored_step(monkeypatch):
    # kl_beta > 0 on a tree (split edges drawn with 4x the std): the KL the trainer adds must be
    # ||mu - mu_ref||^2 / (2 std^2) with each transition's own std (split scale included), not a flow formula
    t = make("branchgrpo", "rollout.prompts_per_step=1", "train.kl_beta=0.1")
    seen = {}
    real = trainer_mod.transition_kl

    def recording(mean, ref_mean, std, **kwargs):
        seen["std"] = std.detach().clone()
        return real(mean, ref_mean, std, **kwargs)

    monkeypatch.setattr(trainer_mod, "transition_kl", recording)
    stored = {}
    real_update = t.update

    def update(tr, adv, n, gen, **kwargs):
        stored["tr"] = tr
        return real_update(tr, adv, n, gen, **kwargs)

    t.update = update
    t.cfg.train.micro_batch = 100_000
    t.cfg.train.accumulate = "transitions"
    t.cfg.train.accumulate_size = 100_000
    t.step()
    tr = stored["tr"]
    want = tr.noise_scale * tr.g * (tr.sigma - tr.sigma_next).sqrt()  # [E] in the update's shuffled order
    assert seen["std"].shape == want.shape and (tr.noise_scale > 1).any()
    assert torch.allclose(torch.sort(seen["std"]).values, torch.sort(want).values)


# ---- Flow-GRPO's zero-advantage filter (train.drop_zero_advantage) -------------------------------------------------
def _one_ties(images, prompts):
    """Brightness, except that every image of "one" scores 0.3: that prompt's group ties, as an OCR group that all
    misreads its text does, so its advantages are exactly 0."""
    tie = torch.tensor([p == "one" for p in prompts])
    return torch.where(tie, torch.full((len(prompts),), 0.3), brightness(images, prompts))


def _gradients(t: GRPOTrainer, start: list[torch.Tensor], tr: Transitions, adv: torch.Tensor, drop: bool) -> list:
    """The gradient of one update (a single accumulation group) of ``tr`` at the weights ``start``."""
    t.cfg.train.drop_zero_advantage = drop
    with torch.no_grad():
        for p, s in zip(t.params, start):
            p.copy_(s)
    t.update(tr, adv, 8, torch.Generator().manual_seed(5), cond=t.step_cond)
    return [p.grad.clone() for p in t.params]


def test_drop_zero_advantage_leaves_a_tied_group_out_of_the_gradient_and_the_mean():
    t = make("flowgrpo", "train.drop_zero_advantage=true", "train.accumulate=transitions", "train.accumulate_size=100000",
             rewards={"tied": (_one_ties, 1.0)}, prompts=("zero", "one"))
    stored, real_update = {}, t.update
    t.update = lambda tr, adv, *args, **kwargs: stored.update(tr=tr, adv=adv) or real_update(tr, adv, *args, **kwargs)
    start = [p.detach().clone() for p in t.params]
    metrics = t.step()
    tr, adv = stored["tr"], stored["adv"]
    live = adv != 0  # [E]: the group of "zero"; the 4 images of "one" x 9 trained steps tie
    assert int((~live).sum()) == 4 * 9 and int(live.sum()) == 4 * 9
    assert metrics["dropped_transitions"] == 36 and metrics["transitions"] == 36 and metrics["nfe_new"] == 36 / 8
    t.update = real_update
    on = _gradients(t, start, tr, adv, drop=True)
    alone = _gradients(t, start, tr.select(live.nonzero().flatten()), adv[live], drop=False)  # the live group only
    off = _gradients(t, start, tr, adv, drop=False)
    for g_on, g_alone, g_off in zip(on, alone, off):
        torch.testing.assert_close(g_on, g_alone)  # the tied rows add no gradient and are not counted in the mean
        torch.testing.assert_close(g_off, g_alone * 36 / 72)  # off: they count in the mean with a zero policy loss
    assert any(g.abs().max() > 0 for g in on)


def test_drop_zero_advantage_with_every_group_tied_takes_no_step():
    constant = lambda images, prompts: torch.full((len(prompts),), 0.3)  # noqa: E731
    t = make("flowgrpo", "train.drop_zero_advantage=true", rewards={"tied": (constant, 1.0)})
    before = [p.detach().clone() for p in t.params]
    metrics = t.step()
    assert metrics["updates"] == 0 and metrics["transitions"] == 0 and metrics["dropped_transitions"] == 8 * 9
    assert all(torch.equal(b, p) for b, p in zip(before, t.params))
    off = make("flowgrpo", rewards={"tied": (constant, 1.0)}).step()  # off: the steps run (zero policy loss)
    assert off["updates"] >= 1 and off["dropped_transitions"] == 0 and off["transitions"] == 8 * 9


# ---- train.exclude_last_step -------------------------------------------------------------------------------------
def test_exclude_last_step_never_selects_the_last_step_with_the_final_sample_scored():
    final = ["sampler.reward_image=final", "sampler.num_steps=6"]
    for method_name, extra in (("dancegrpo", ["train.timestep_fraction=1.0"]), ("dancegrpo", []),
                               ("flowgrpo", ["train.first_k=0"]), ("branchgrpo", ["tree.split_steps=[0, 5]"])):
        for exclude in (True, False):
            cfg = load_config(None, [*final, *extra, f"train.exclude_last_step={exclude}"], method=method_name)
            plan = method.step_plan(cfg, 0)
            mask = method.store_mask(cfg, plan, 64, torch.Generator().manual_seed(0))  # [64, 6] or None (tree)
            last = plan.trained[-1] if mask is None else bool(mask[:, -1].any())
            assert last is not exclude, (method_name, extra, exclude)
    cfg = load_config(None, [*final, "train.timestep_fraction=1.0", "train.exclude_last_step=true"], method="dancegrpo")
    assert bool(method.store_mask(cfg, method.step_plan(cfg, 0), 4, torch.Generator())[:, :-1].all())  # the other 5


def test_exclude_last_step_in_a_training_step_and_the_dancegrpo_sd_preset():
    # 8 samples x 15 of 16 steps: the stored transitions never end at sigma 0 (the last step's end)
    t = make("dancegrpo", "sampler.reward_image=final", "train.exclude_last_step=true", "train.timestep_fraction=1.0")
    stored, real_update = {}, t.update
    t.update = lambda tr, *args, **kwargs: stored.update(tr=tr) or real_update(tr, *args, **kwargs)
    assert t.step()["transitions"] == 8 * 15 and bool((stored["tr"].sigma_next > 0).all())
    cfg = load_config(method="dancegrpo-sd")  # train_grpo_sd.py: timestep_fraction 1.0 over timesteps[:-1]
    assert (cfg.train.timesteps, cfg.train.timestep_fraction, cfg.train.exclude_last_step) == ("random_fraction", 1.0, True)
    assert cfg.sampler.reward_image == "final" and method.trainable_positions(cfg) == 49


def test_exclude_last_step_on_a_one_step_sampler_is_a_config_error():
    from flowgrove.messages import ConfigError

    with pytest.raises(ConfigError, match=r"sampler.num_steps=1 with train.exclude_last_step=true leaves no trainable"):
        load_config(None, ["sampler.num_steps=1", "sampler.reward_image=final", "train.exclude_last_step=true"])


# ---- CPS through the trainer -------------------------------------------------------------------------------------
def _stored_transitions(t: GRPOTrainer) -> dict:
    stored, real = {}, t.update

    def update(tr, adv, n, gen, **kwargs):
        stored["tr"] = tr
        return real(tr, adv, n, gen, **kwargs)

    t.update = update
    return stored


@pytest.mark.parametrize("extra", [("train.timesteps=random_fraction", "train.timestep_fraction=1.0"),
                                   ("train.timesteps=first_k", "train.first_k=0"), ("train.timesteps=plan",)])
def test_cps_chains_train_every_noisy_step_under_the_cps_density(extra):
    # flowgrpo-cps (final sample as the image): the last step lands on sigma 0 with no noise, so however the trained
    # steps are chosen it is never stored; every stored edge is re-scored with the CPS step, so the first importance
    # ratio is exactly 1, and an "sde" re-score of the same edges is another density.
    t = make("flowgrpo-cps", *extra)
    stored = _stored_transitions(t)
    metrics = t.step()
    tr = stored["tr"]
    assert (tr.sigma_next > 0).all() and set(tr.depth.tolist()) == set(range(1, 10))
    assert metrics["first_ratio_max_dev"] == 0.0
    with torch.no_grad():
        cps = trainer_mod.rescore_step(t.policy, tr, t.step_cond, "cps")
        sde = trainer_mod.rescore_step(t.policy, tr, t.step_cond, "constant")
    assert torch.equal(cps.std, tr.g * tr.sigma_next) and not torch.allclose(sde.log_prob, cps.log_prob)


def test_cps_trees_split_with_the_cps_step_and_skip_the_noiseless_last_step():
    t = make("branchgrpo", "rollout.prompts_per_step=1", "sampler.noise=cps", "sampler.noise_level=0.5",
             "tree.split_noise_scale=1.4")
    stored = _stored_transitions(t)
    metrics = t.step()
    tr = stored["tr"]
    assert metrics["first_ratio_max_dev"] == 0.0 and (tr.sigma_next > 0).all()
    split = tr.noise_scale > 1
    assert split.any() and torch.allclose(tr.g, torch.full_like(tr.g, math.sin(math.pi / 4)))  # g = sin(0.5 pi / 2)
    with torch.no_grad():
        std = trainer_mod.rescore_step(t.policy, tr, t.step_cond, "cps").std
    assert torch.allclose(std, tr.noise_scale * tr.g * tr.sigma_next) and torch.allclose(tr.noise_scale[split], torch.tensor(1.4))
