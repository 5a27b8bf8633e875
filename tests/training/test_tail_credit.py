"""Regression: a rollout's deterministic DPM-Solver++ tail must move its image WITH the model's data predictions.

The reward image of a Flash tail is a combination of the model's data predictions D at the tail's noise levels. GRPO
credits only the window's SDE log-probs, so an update that moves the prediction at a trained (or nearby) noise level
towards better images must not move the image the other way. Plain 2M extrapolation did: its history crossed the
last SDE step, and on a compressed tail (a step several times longer in lambda than the one before) it gave the
prediction at the last trained step (flowgrove: -0.22, Flash*: -0.23) or at the first tail point (-0.12) a negative
weight, ~10-20x larger than the window step's own effect; training then destroyed the reward it ascended
(flowgrove digit_classifier 0.99 -> 0.28 in 100 steps).
"""

from __future__ import annotations

import pytest
import torch

from flowgrove.config import load_config
from flowgrove.training import method
from flowgrove.training.rollout import rollout


class PointPolicy:
    """Data prediction ``D(x, sigma) = 0.1 x + 0.5``, plus ``bump`` at one noise level (velocity ``(x - D) / sigma``)."""

    def __init__(self, bump_sigma: float = -1.0, bump: float = 0.0):
        self.bump_sigma, self.bump = bump_sigma, bump

    def velocity(self, x, sigma, cond):
        d = 0.1 * x + 0.5  # [N, ...]
        hit = ((sigma - self.bump_sigma).abs() < 1e-6).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # [N, 1, ...]
        return (x - (d + self.bump * hit)) / sigma.view(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("preset", ["flowgrove", "mixgrpo-flash-star", "mixgrpo-flash"])
def test_tail_image_moves_with_every_prediction_after_the_window(preset, tiny_policy):
    cfg = load_config(method=preset)
    plan = method.step_plan(cfg, 0)
    spec = method.rollout_spec(cfg, plan)
    cond = tiny_policy.encode_prompts(["three"])
    n = 2 if cfg.tree.enabled else 4
    rows, x_init = torch.zeros(n, dtype=torch.long), torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def leaves(policy):
        return rollout(policy, cond, rows, x_init, spec, torch.Generator().manual_seed(1)).leaves

    base = leaves(PointPolicy())
    last_sde = max(plan.sde_steps)
    eps = 1e-3
    for step in range(last_sde, plan.num_steps - 1):  # the last trained step and every tail point before the last
        sigma = plan.sigmas[step].item()
        # the image is the last prediction D = 0.1 x + 0.5: / 0.1 is the bump's weight in the last model input
        weight = (leaves(PointPolicy(sigma, eps)) - base).mean().item() / eps / 0.1
        assert weight >= 0, (f"{preset}: raising the model's data prediction at sigma {sigma:.3f} (step {step}, "
                             f"{plan.kinds[step]}) moves the rollout's reward image the other way (weight {weight:+.3f})")


DPM_PRESETS = ["flowgrove", "mixgrpo-flash-star", "mixgrpo-flash"]


@pytest.mark.parametrize("preset", DPM_PRESETS)
def test_the_tails_last_model_call_is_at_the_fine_end_of_the_grid(preset):
    """The second collapse mechanism: MixGRPO's tail points (a time-shifted linspace) put the tail's last model call at a
    mid noise level (flowgrove 0.375, Flash* 0.538), so the reward image was the model's x0 prediction there, which
    every update moves (uncredited) far more than the fine steps near sigma 0 that the evaluation sampler ends with.
    The presets' tails end where the uncompressed grid ends."""
    cfg = load_config(method=preset)
    full = method.base_sigmas(cfg)
    for iteration in range(0, 3 * cfg.train.steps, 5):  # a progressive window moves the tail's start
        plan = method.step_plan(cfg, iteration)
        if "dpm" in plan.kinds:  # the last nonzero sigma: the last model call
            torch.testing.assert_close(plan.sigmas[-2], full[-2], msg=f"{preset} at iteration {iteration}")
    plan = method.step_plan(cfg, 0)
    shifted = method.step_plan(load_config(method=preset, overrides=["window.tail_spacing=shifted"]), 0)
    assert shifted.sigmas[-2] > 1.5 * full[-2]  # the reference spacing (kept as a switch) ends at a higher noise level
    assert plan.num_steps >= shifted.num_steps  # as many model calls, or the few more a coarse tail needs


def test_the_compressed_tail_follows_the_evaluation_sampler_closer_than_the_reference_spacing():
    """On the shipped digits policy, ODE samples whose tail is compressed (Flash*: 3 DPM-Solver++ steps after the
    window) against the 25-step Euler samples the evaluation draws: log-SNR spacing is the closer (measured 0.084 against
    MixGRPO's 0.126 mean absolute pixel error, pixels in [-1, 1])."""
    from flowgrove.policies import build_policy
    from flowgrove.samplers.family import FLOW_STEPS
    from flowgrove.samplers.schedules import compressed_tail_sigmas, flux_sigmas

    policy = build_policy("digits")
    prompts = policy.default_prompts() * 4
    cond, n = policy.encode_prompts(prompts), len(prompts)

    def sample(grid: torch.Tensor, last_euler: int) -> torch.Tensor:
        x, prev = torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(0)), (None, None)
        with torch.no_grad():
            for i in range(grid.numel() - 1):
                s, s_next = grid[i].item(), grid[i + 1].item()
                v = policy.velocity(x, x.new_full((n,), s), cond).float()
                if i <= last_euler:
                    x = FLOW_STEPS.ode(x, v, s, s_next)
                    continue
                d = FLOW_STEPS.x0(x, v, s)
                x, prev = FLOW_STEPS.dpm(x, d, s, s_next, *prev, monotone=True), (d, s)
        return x

    fine = sample(flux_sigmas(25, 3.0), 25)
    error = {spacing: (sample(compressed_tail_sigmas(25, 3.0, 3, 0.2, spacing=spacing), 3) - fine).abs().mean().item()
             for spacing in ("logsnr", "shifted")}
    assert error["logsnr"] < 0.8 * error["shifted"], error


@pytest.mark.parametrize("preset", DPM_PRESETS)
def test_the_tails_steps_are_fine_enough_to_hold_at_three_times_the_default_length(preset):
    """The third mechanism: a tail that integrates the never-trained, drifting low-noise network in too few steps parts
    from the images the policy makes, and the updates follow its errors. Measured on digits over 300 steps (one
    seed, docs/collapse.md): largest log-SNR step 1.47 (flowgrove, 3 steps) and 2.41 (Flash*, ratio 0.2) collapsed;
    1.21 (Flash*, ratio 0.3), 0.80 (ratio 0.4) and 0.59 (flowgrove, 6 steps) held; mixgrpo-flash's progressive window
    reached tails of [0.538, 0.111, 0] and [0.364, 0] and collapsed there. Every preset keeps below 1.25 at every
    window position."""
    cfg = load_config(method=preset)
    for iteration in range(0, 3 * cfg.train.steps, 5):  # a progressive window moves the tail's start
        plan = method.step_plan(cfg, iteration)
        s = plan.sigmas.double()
        dpm = [i for i, kind in enumerate(plan.kinds) if kind == "dpm" and s[i + 1] > 0]  # the last step (to 0) aside
        lam = torch.log((1 - s) / s)  # [S + 1] log-SNR, +inf at sigma 0
        widest = max((lam[i + 1] - lam[i]).item() for i in dpm) if dpm else 0.0
        assert widest <= 1.25, f"{preset} at iteration {iteration}: a DPM tail step spans {widest:.2f} in log-SNR"
