"""The diffusion step family: DDIM with eta against diffusers' DDIMScheduler, DPM-Solver++(2M) against
DPMSolverMultistepScheduler, log-probs against torch.distributions.Normal, and 1-D Gaussian data where the exact
noise prediction is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrove.samplers.diffusion import (
    ddim_dpm_step,
    ddim_ode_step,
    ddim_step,
    diffusion_score,
    predict_x0_eps,
    rescale_zero_terminal_snr,
    scaled_linear_alphas_cumprod,
)
from flowgrove.samplers.family import FLOW_STEPS, DiffusionSchedule, diffusion_steps, sample_ode

diffusers = pytest.importorskip("diffusers")


def _ddim(prediction_type: str, zero_snr: bool = False, steps: int = 10, spacing: str = "trailing"):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr,
                                    timestep_spacing=spacing)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_equal_diffusers(zero_snr):
    ours = scaled_linear_alphas_cumprod()
    if zero_snr:
        ours = rescale_zero_terminal_snr(ours)
        assert float(ours[-1]) == 0.0
    torch.testing.assert_close(ours, _ddim("epsilon", zero_snr).alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("v_prediction", True)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers(prediction_type, zero_snr, eta):
    """Every step of a 10-step trailing grid, through the family (sigma = linspace(1, 0, 11)) and diffusers."""
    sched = _ddim(prediction_type, zero_snr)
    schedule = DiffusionSchedule(sched.alphas_cumprod, float(sched.final_alpha_cumprod), prediction_type)
    family = diffusion_steps(schedule)
    sigmas = torch.linspace(1, 0, 11)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        assert float(schedule.timestep(sigmas[i])) == float(t)
        x, out, z = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
        ref = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        step = family.sde(x, out, sigmas[i], sigmas[i + 1], eta, noise=z)
        if not torch.isfinite(ref).all():  # abar_t = 0, eta = 1: diffusers takes sqrt(1 - abar_prev - std^2) of -1e-8
            assert zero_snr and eta == 1 and i == 0 and torch.isfinite(step.x_next).all()
            continue
        torch.testing.assert_close(step.x_next, ref, atol=1e-6, rtol=1e-5)
        if eta == 0:
            assert step.log_prob is None
            torch.testing.assert_close(family.ode(x, out, sigmas[i], sigmas[i + 1]), step.x_next, atol=0, rtol=0)


def test_ddim_log_prob_is_normal_mean_over_dims_under_the_drawn_std():
    ab = scaled_linear_alphas_cumprod()
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    step = ddim_step(x, out, ab[600], ab[400], 1.0, noise_scale=2.0, generator=gen)
    normal = torch.distributions.Normal(step.mean, step.std.view(-1, 1, 1, 1))
    torch.testing.assert_close(step.log_prob, normal.log_prob(step.x_next).mean(dim=(1, 2, 3)))
    rescored = ddim_step(x, out, ab[600], ab[400], 1.0, noise_scale=2.0, x_next=step.x_next)
    assert torch.equal(rescored.log_prob, step.log_prob)
    sum_ = ddim_step(x, out, ab[600], ab[400], 1.0, noise_scale=2.0, x_next=step.x_next, reduce="sum")
    torch.testing.assert_close(sum_.log_prob, normal.log_prob(step.x_next).sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_split_step_draws_and_scores_with_the_split_noise_multiplier(prediction_type):
    """A tree split step (BranchGRPO) scales the DDIM noise: ``x_prev = mean + k sigma_t z``. That is diffusers'
    DDIMScheduler step with ``variance_noise = k z``; the mean is the unsplit step's, the std ``k sigma_t``, and the
    log-prob (and its re-score) is under that std. Per-sample multipliers: row 0 splits (k = 4), row 1 does not."""
    sched = _ddim(prediction_type)
    family = diffusion_steps(DiffusionSchedule(sched.alphas_cumprod, float(sched.final_alpha_cumprod), prediction_type))
    sigmas = torch.linspace(1, 0, 11)
    gen = torch.Generator().manual_seed(4)
    scale = torch.tensor([4.0, 1.0])
    for i, t in enumerate(sched.timesteps):
        x, out, z = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
        plain = family.sde(x, out, sigmas[i], sigmas[i + 1], 1.0, noise=z)
        split = family.sde(x, out, sigmas[i], sigmas[i + 1], 1.0, noise_scale=scale, noise=z)
        ref = sched.step(out, t, x, eta=1.0, variance_noise=scale.view(-1, 1, 1, 1) * z).prev_sample
        torch.testing.assert_close(split.x_next, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(split.mean, plain.mean, atol=0, rtol=0)
        torch.testing.assert_close(split.std, scale * plain.std, atol=0, rtol=0)
        assert float(plain.std[0]) > 0 and not torch.allclose(split.x_next[0], plain.x_next[0])
        torch.testing.assert_close(split.x_next[1], plain.x_next[1], atol=0, rtol=0)
        normal = torch.distributions.Normal(split.mean, split.std.view(-1, 1, 1, 1))
        torch.testing.assert_close(split.log_prob, normal.log_prob(split.x_next).mean(dim=(1, 2, 3)))
        rescored = family.sde(x, out, sigmas[i], sigmas[i + 1], 1.0, noise_scale=scale, x_next=split.x_next)
        assert torch.equal(rescored.log_prob, split.log_prob)


def test_x0_eps_and_score_invert_the_forward_process():
    ab = torch.tensor([0.9, 0.3, 0.05], dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 6, generator=gen, dtype=torch.float64), torch.randn(3, 6, generator=gen, dtype=torch.float64)
    a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    x = a * x0 + s * eps
    for kind, out in (("epsilon", eps), ("v_prediction", a * eps - s * x0)):
        got_x0, got_eps = predict_x0_eps(x, out, ab, kind)
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)
    torch.testing.assert_close(diffusion_score(eps, ab), -eps / s)


# 1-D Gaussian data x0 ~ N(m, d^2): x_t ~ N(a m, a^2 d^2 + s^2), so E[eps | x_t] = s (x_t - a m) / (a^2 d^2 + s^2).
MEAN, STD = 1.5, 0.5


def _exact_eps(schedule: DiffusionSchedule):
    def eps(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar(sigma).to(x.dtype)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return s * (x - a * MEAN) / (ab * STD**2 + 1 - ab)
    return eps


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_keeps_the_gaussian_data_marginals(eta):
    """400 steps, 20k samples from the exact marginal at timestep 999: final mean and std within 0.02 of the data's
    (Monte-Carlo error of either ~0.004)."""
    ab = scaled_linear_alphas_cumprod(dtype=torch.float64)
    schedule = DiffusionSchedule(ab, 1.0)
    family, eps = diffusion_steps(schedule), _exact_eps(schedule)
    sigmas = torch.linspace(1, 0, 401, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20_000, 1, generator=gen, dtype=torch.float64)
    x = ab[-1].sqrt() * MEAN + (ab[-1] * STD**2 + 1 - ab[-1]).sqrt() * x  # N(a m, a^2 d^2 + s^2)
    for i in range(400):
        x = family.sde(x, eps(x, sigmas[i]), sigmas[i], sigmas[i + 1], eta, generator=gen).x_next
    print(f"eta {eta}: mean {float(x.mean()):.4f} std {float(x.std()):.4f}")
    assert abs(float(x.mean()) - MEAN) < 0.02 and abs(float(x.std()) - STD) < 0.02


def test_ddim_dpm_step_equals_diffusers_dpmsolver():
    """A 6-step DPM-Solver++(2M) run (lower_order_final, final sigma 0) with a fixed nonlinear eps model."""
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                  algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
    sched.set_timesteps(6)
    abars = 1 / (1 + sched.sigmas.double() ** 2)  # [7], the last sigma is 0 (abar 1)
    model = lambda x, t: torch.tanh(x) * (1 + t / 1000)  # noqa: E731
    gen = torch.Generator().manual_seed(4)
    x_ref = x = torch.randn(2, 4, 3, 3, generator=gen)
    prev_x0 = prev_ab = None
    for i, t in enumerate(sched.timesteps):
        x_ref = sched.step(model(x_ref, t), t, x_ref).prev_sample
        x0 = predict_x0_eps(x, model(x, t), abars[i], "epsilon")[0]
        x = ddim_dpm_step(x, x0, abars[i], abars[i + 1], prev_x0, prev_ab)
        prev_x0, prev_ab = x0, abars[i]
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def _exact_ode(schedule: DiffusionSchedule, sigma: float, sigma_end: float, x: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE of 1-D Gaussian data is the affine transport between the two marginals."""
    ab, ab_end = schedule.alpha_bar(sigma), schedule.alpha_bar(sigma_end)
    z = (x - ab.sqrt() * MEAN) / (ab * STD**2 + 1 - ab).sqrt()
    return ab_end.sqrt() * MEAN + (ab_end * STD**2 + 1 - ab_end).sqrt() * z


def test_ddim_dpm_step_converges_at_order_two():
    """Gaussian data (exact eps, exact ODE solution), sigma 1 -> 0.3: the 2M error falls 4x per halving (DDIM 2x)."""
    schedule = DiffusionSchedule(scaled_linear_alphas_cumprod(dtype=torch.float64), 1.0)
    family, eps = diffusion_steps(schedule), _exact_eps(schedule)
    x_init = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    exact = _exact_ode(schedule, 1.0, 0.3, x_init)

    def errors(n: int) -> tuple[float, float]:
        sigmas = torch.linspace(1, 0.3, n + 1, dtype=torch.float64)
        x, prev = x_init, (None, None)
        for i in range(n):
            x0 = family.x0(x, eps(x, sigmas[i]), sigmas[i])
            x, prev = family.dpm(x, x0, sigmas[i], sigmas[i + 1], *prev), (x0, sigmas[i])
        ddim = sample_ode(family, eps, x_init, sigmas)
        return float((x - exact).abs().max()), float((ddim - exact).abs().max())

    errs = [errors(n) for n in (8, 16, 32, 64)]  # measured: 7.0e-3, 1.8e-3, 4.4e-4, 1.1e-4 (DDIM 3.1e-2 ... 4.0e-3)
    for (dpm, ddim), (dpm_half, ddim_half) in zip(errs, errs[1:]):
        assert 1.8 < math.log2(dpm / dpm_half) < 2.2 and 0.8 < math.log2(ddim / ddim_half) < 1.2, errs


def test_flow_family_is_the_flow_functions():
    from flowgrove.samplers import dpmpp_2m_step, euler_step, sde_step, x0_from_velocity
    from flowgrove.samplers.steps import add_noise, velocity_target

    assert FLOW_STEPS[1:] == (x0_from_velocity, sde_step, euler_step, dpmpp_2m_step, add_noise, velocity_target)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_and_target_equal_diffusers(prediction_type):
    """At every timestep of a 10-step trailing grid: the noised sample is DDIMScheduler.add_noise and the target is
    the noise (epsilon) or DDIMScheduler.get_velocity (v_prediction), with the noise levels of a mixed batch."""
    sched = _ddim(prediction_type)
    family = diffusion_steps(DiffusionSchedule(sched.alphas_cumprod, float(sched.final_alpha_cumprod), prediction_type))
    sigmas = torch.linspace(1, 0, 11)[:-1]  # [10] timesteps 999, 899, ..., 99
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(10, 4, 3, 3, generator=gen), torch.randn(10, 4, 3, 3, generator=gen)
    timesteps = sched.timesteps.long()  # [10], the one of each row's sigma
    torch.testing.assert_close(family.add_noise(x0, noise, sigmas), sched.add_noise(x0, noise, timesteps))
    expected = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(family.target(x0, noise, sigmas), expected)


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon", "v_prediction"])
def test_the_target_at_the_noised_sample_predicts_the_clean_sample(prediction_type):
    # The output pretraining regresses is the one whose data prediction at the noised sample is the clean sample.
    if prediction_type == "flow":
        family = FLOW_STEPS
    else:
        ab = scaled_linear_alphas_cumprod(dtype=torch.float64)
        family = diffusion_steps(DiffusionSchedule(ab, float(ab[0]), prediction_type))
    gen = torch.Generator().manual_seed(4)
    x0, noise = (torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.31, 0.1, 0.02], dtype=torch.float64)
    x = family.add_noise(x0, noise, sigma)
    torch.testing.assert_close(family.x0(x, family.target(x0, noise, sigma), sigma), x0, atol=1e-9, rtol=1e-9)


def test_ddim_ode_step_equals_eta_zero():
    ab = scaled_linear_alphas_cumprod()
    gen = torch.Generator().manual_seed(5)
    x, out = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    torch.testing.assert_close(ddim_ode_step(x, out, ab[500], ab[300]), ddim_step(x, out, ab[500], ab[300], 0.0).x_next,
                               atol=0, rtol=0)


@pytest.mark.parametrize("level", [0.3, 0.8, 1.0])
def test_ddim_cps_step_keeps_the_marginal_of_a_point_mass(level):
    """sde_type="cps" in diffusion variables: from x = a c + s eps with the exact eps prediction (x - a c) / s, one
    step gives a' c + sqrt(1 - abar' - std^2) eps + std z with std = sin(level pi/2) sqrt(1 - abar'), i.e. exactly
    N(a' c, 1 - abar') (read off three evaluations of the affine map (eps, z) -> x'), and its log-prob is the
    Gaussian one under that std."""
    from flowgrove.samplers.steps import noise_g

    schedule = DiffusionSchedule(scaled_linear_alphas_cumprod(dtype=torch.float64), 1.0)
    family, c = diffusion_steps(schedule), 0.7
    for sigma, sigma_next in ((1.0, 0.9), (0.6, 0.3), (0.2, 0.1)):
        ab, ab_next = schedule.alpha_bar(sigma), schedule.alpha_bar(sigma_next)
        eps = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
        z = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
        x = ab.sqrt() * c + (1 - ab).sqrt() * eps  # [3, 1]
        g = noise_g("cps", level, sigma, sigma_next)
        step = family.sde(x, (x - ab.sqrt() * c) / (1 - ab).sqrt(), sigma, sigma_next, g, sde_type="cps", noise=z)
        out = step.x_next.flatten()
        a, b, w = out[0], out[1] - out[0], out[2] - out[0]
        torch.testing.assert_close(a, ab_next.sqrt() * c, rtol=0, atol=1e-12)
        torch.testing.assert_close(b**2 + w**2, 1 - ab_next, rtol=0, atol=1e-12)
        torch.testing.assert_close(step.std, math.sin(level * math.pi / 2) * (1 - ab_next).sqrt().expand(3))
    normal = torch.distributions.Normal(step.mean, step.std.view(-1, 1))
    torch.testing.assert_close(step.log_prob, normal.log_prob(step.x_next).mean(dim=1))
    # the last step onto the data (final abar 1) draws no noise
    last = family.sde(x, x, 0.1, 0.0, g, sde_type="cps", noise=z)
    assert (last.std == 0).all() and last.log_prob is None
