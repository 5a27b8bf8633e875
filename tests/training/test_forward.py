"""Forward-process objectives (train.objective=nft, awm) in the trainer: the rows a rollout's final samples give, their
noise and times, the rollout policy's output taken before the update, and one step end to end on a tiny policy."""

from __future__ import annotations

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.grpo.matching import output_kl
from flowgrove.samplers.family import FLOW_STEPS, DiffusionSchedule, diffusion_steps
from flowgrove.samplers.diffusion import scaled_linear_alphas_cumprod
from flowgrove.training import method
from flowgrove.training.forward import ForwardSamples, forward_samples
from flowgrove.training.rollout import NoiseSource
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy, brightness

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rewards={brightness: 1.0}"]
ODE = ["sampler.noise_level=0", "rollout.same_noise_in_group=false"]


def make(objective: str, *extra: str, method_name: str = "dancegrpo") -> GRPOTrainer:
    cfg = load_config(None, [*SMALL, *ODE, f"train.objective={objective}", "train.clip_range=1.0", *extra],
                      method=method_name)
    cfg.rewards = {"brightness": 1.0}
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, ["zero", "one", "two"])


def observe(trainer: GRPOTrainer) -> dict:
    """Record what the next step hands to ``update``."""
    seen: dict = {}
    update = trainer.update

    def spy(batch, adv, n_samples, generator, **kwargs):
        seen.update(batch=batch, adv=adv.clone(), n_samples=n_samples)
        return update(batch, adv, n_samples, generator, **kwargs)

    trainer.update = spy
    return seen


def _leaves(seed: int = 0):
    policy = TinyPolicy()
    cond = policy.encode_prompts(["zero", "one", "two"])
    gen = torch.Generator().manual_seed(seed)
    leaves = torch.randn(4, 1, 4, 4, generator=gen)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)  # [N=4, T=3]
    return policy, cond, leaves, torch.tensor([2, 0, 1, 1]), mask, torch.tensor([1.0, 0.6, 0.2])


@pytest.mark.parametrize("family", ["flow", "epsilon"])
def test_rows_are_the_samples_noised_at_their_masked_times(family):
    policy, cond, leaves, rows, mask, times = _leaves()
    if family != "flow":  # a diffusion policy noises with its own forward process
        ab = scaled_linear_alphas_cumprod()
        policy.step_family = diffusion_steps(DiffusionSchedule(ab, float(ab[0]), family))
    fam = FLOW_STEPS if family == "flow" else policy.step_family
    out = forward_samples(policy, cond, leaves, rows, mask, times, NoiseSource(torch.Generator().manual_seed(7)))
    assert isinstance(out, ForwardSamples) and len(out) == 7
    assert out.sample.tolist() == [0, 0, 1, 1, 2, 2, 3]  # sample-major, in the mask's order
    torch.testing.assert_close(out.sigma, torch.tensor([1.0, 0.2, 0.6, 0.2, 1.0, 0.6, 0.2]))
    assert torch.equal(out.x0, leaves[out.sample]) and torch.equal(out.cond_index, rows[out.sample])
    torch.testing.assert_close(out.noise, torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(7)))
    x = fam.add_noise(out.x0, out.noise, out.sigma)
    with torch.no_grad():
        expected = policy.velocity(x, out.sigma, cond.select(out.cond_index))
    torch.testing.assert_close(out.old_output, expected)
    chunked = forward_samples(policy, cond, leaves, rows, mask, times, NoiseSource(torch.Generator().manual_seed(7)), 3)
    torch.testing.assert_close(chunked.old_output, out.old_output)


def test_each_rank_gets_its_rows_of_the_global_draw():
    # Two ranks with two of the four samples each (two times per sample, as every rank draws the same count): their
    # rows one after the other are the one-process rows, noise included.
    policy, cond, leaves, rows, _, times = _leaves()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    one = forward_samples(policy, cond, leaves, rows, mask, times, NoiseSource(torch.Generator().manual_seed(3)))
    parts = [forward_samples(policy, cond, leaves[r * 2:r * 2 + 2], rows[r * 2:r * 2 + 2], mask[r * 2:r * 2 + 2], times,
                             NoiseSource(torch.Generator().manual_seed(3), world=2, rank=r)) for r in range(2)]
    for field in ("x0", "noise", "sigma", "old_output", "cond_index"):
        torch.testing.assert_close(torch.cat([getattr(p, field) for p in parts]), getattr(one, field))


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_a_step_trains_the_final_samples_and_stores_no_transition(objective):
    trainer = make(objective)
    seen = observe(trainer)
    before = [p.detach().clone() for p in trainer.params]
    sigmas: list[float] = []
    hook = trainer.policy.module.register_forward_hook(
        lambda mod, args, out: sigmas.extend(args[1].tolist()) if torch.is_grad_enabled() else None)
    metrics = trainer.step()
    hook.remove()
    batch = seen["batch"]
    # 8 samples x int(16 * 0.6) = 9 grid times each; every training forward is at a grid time of its row
    assert isinstance(batch, ForwardSamples) and len(batch) == 72 and metrics["transitions"] == 72
    assert (metrics["nfe_old"], metrics["nfe_new"]) == (16.0, 9.0)
    grid = method.base_sigmas(trainer.cfg)[:-1]
    assert sorted(sigmas) == sorted(batch.sigma.tolist()) and set(batch.sigma.tolist()) <= set(grid.tolist())
    assert torch.bincount(batch.sample).tolist() == [9] * 8
    # each row carries its sample's advantage: one value per sample, z-scores that sum to 0 within each group
    per_sample = torch.stack([seen["adv"][batch.sample == s][0] for s in range(8)])  # [8]
    assert all(seen["adv"][batch.sample == s].unique().numel() == 1 for s in range(8))
    assert per_sample.view(2, 4).sum(1).abs().max() < 1e-5 and per_sample.abs().min() > 0
    assert metrics["first_ratio_max_dev"] < 1e-5 and metrics["updates"] == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))


def test_the_old_output_is_the_rollout_policys():
    # Taken before the update: a second update on the same rows starts from moved weights, so nft's drift is > 0.
    trainer = make("nft")
    seen = observe(trainer)
    assert trainer.step()["approx_kl"] < 1e-10  # one optimizer step, one micro-batch: v = v_old throughout
    stats = trainer.update(seen["batch"], seen["adv"], seen["n_samples"], torch.Generator().manual_seed(0))
    assert stats.approx_kl > 1e-10


def test_the_kl_term_is_the_output_difference_to_the_initial_policy():
    trainer = make("awm", "train.kl_beta=0.01", "train.accumulate_size=4")  # 2 optimizer steps per rollout
    seen = observe(trainer)
    reference = TinyPolicy()  # the same initial weights
    metrics = trainer.step()
    assert metrics["kl"] > 0  # the second optimizer step's rows see moved weights
    batch = seen["batch"]
    x = FLOW_STEPS.add_noise(batch.x0, batch.noise, batch.sigma)
    cond = trainer.step_cond.select(batch.cond_index)
    with torch.no_grad():
        now = output_kl(trainer.policy.velocity(x, batch.sigma, cond), reference.velocity(x, batch.sigma, cond))
    assert now.mean() > metrics["kl"] > 0  # after both steps the distance is larger than on average during them


@pytest.mark.parametrize("name", ["diffusionnft", "awm"])
def test_the_presets_roll_out_deterministic_dpm_tails(name):
    cfg = load_config(None, [], method=name)
    plan = method.step_plan(cfg, 0)
    assert plan.kinds[0] == "sde" and set(plan.kinds[1:]) == {"dpm"} and plan.trained_steps == ()
    assert cfg.sampler.noise_level == 0 and plan.nfe_old == cfg.sampler.num_steps
    assert method.store_mask(cfg, plan, 96, torch.Generator()) is None
    mask = method.forward_mask(cfg, 96, torch.Generator().manual_seed(0))
    assert mask.shape == (96, cfg.sampler.num_steps) and set(mask.sum(1).tolist()) == {9 if name == "diffusionnft" else 6}
