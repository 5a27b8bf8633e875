"""Gaussian log-density, Euler and SDE steps (sampler math against independent references)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from flowgrove.samplers import (
    NOISE_LEVELS,
    constant_g,
    cps_g,
    euler_step,
    flow_grpo_g,
    gaussian_log_prob,
    noise_g,
    sde_step,
    sde_type_of,
    x0_from_velocity,
)
from flowgrove.samplers.schedules import flux_sigmas, sd3_sigmas
from flowgrove.samplers.steps import add_noise, velocity_target


def _latents(seed: int, shape=(4, 2, 3, 5), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- gaussian_log_prob


@pytest.mark.parametrize("per_sample_std", [False, True])
def test_gaussian_log_prob_matches_torch_normal(per_sample_std: bool) -> None:
    x, mean = _latents(0, dtype=torch.float64), _latents(1, dtype=torch.float64)  # [4, 2, 3, 5]
    std = torch.tensor([0.1, 0.5, 1.0, 2.0] if per_sample_std else 0.3, dtype=torch.float64)
    scale = std.view(-1, 1, 1, 1) if per_sample_std else std
    reference = Normal(mean, scale).log_prob(x)  # [4, 2, 3, 5]
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), reference.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduce="sum"), reference.sum(dim=(1, 2, 3)))


def test_gaussian_log_prob_float_std_1d_and_upcast() -> None:
    x, mean = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])
    # log N(0; 0, 1) = -0.5 log(2 pi) = -0.918939; log N(1; 0, 1) = -0.918939 - 0.5 = -1.418939
    torch.testing.assert_close(gaussian_log_prob(x, mean, 1.0), torch.tensor([-0.918939, -1.418939]))
    out = gaussian_log_prob(_latents(0, dtype=torch.bfloat16), _latents(1, dtype=torch.bfloat16), 0.5)
    assert out.dtype == torch.float32 and out.shape == (4,)


def test_gaussian_log_prob_rejects_bad_reduce() -> None:
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, reduce="max")


# ---------------------------------------------------------------- deterministic steps and g


def test_x0_and_euler_by_hand() -> None:
    x, v = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [-1.0]])
    # x0 = x - sigma v = [1 - 0.8 * 0.5, 2 + 0.8 * 1] = [0.6, 2.8]
    torch.testing.assert_close(x0_from_velocity(x, v, 0.8), torch.tensor([[0.6], [2.8]]))
    # Euler: x + (0.6 - 0.8) v = [1 - 0.1, 2 + 0.2]; per-sample sigmas [0.8, 0.5] -> [0.6, 0.25]:
    # [1 + (0.6 - 0.8) * 0.5, 2 + (0.25 - 0.5) * -1] = [0.9, 2.25]
    torch.testing.assert_close(euler_step(x, v, 0.8, 0.6), torch.tensor([[0.9], [2.2]]))
    per_sample = euler_step(x, v, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.25]))
    torch.testing.assert_close(per_sample, torch.tensor([[0.9], [2.25]]))


def test_noise_levels() -> None:
    assert set(NOISE_LEVELS) == {"constant", "flow", "cps"}
    assert [sde_type_of(k) for k in ("constant", "flow", "cps")] == ["sde", "sde", "cps"]
    # cps: sin(0.8 * pi / 2) = sin(72 deg) = 0.9510565, whatever the step
    torch.testing.assert_close(cps_g(0.8, torch.tensor([1.0, 0.3]), torch.tensor([0.9, 0.0])), torch.tensor([0.9510565] * 2))
    assert cps_g(0.0, 0.5, 0.4) == 0 and abs(float(noise_g("cps", 1.0, 0.5, 0.4)) - 1) < 1e-7
    g = constant_g(0.3, torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]))
    torch.testing.assert_close(g, torch.tensor([0.3, 0.3]))
    # flow: 0.7 * sqrt(0.5 / (1 - 0.5)) = 0.7; at sigma 1 with sigma_next 0.75: 0.7 * sqrt(1 / 0.25) = 1.4
    g = flow_grpo_g(0.7, torch.tensor([0.5, 1.0]), torch.tensor([0.4, 0.75]))
    torch.testing.assert_close(g, torch.tensor([0.7, 1.4]))
    torch.testing.assert_close(noise_g("flow", 0.7, 0.5, 0.4), torch.tensor(0.7))
    with pytest.raises(ValueError, match="constant"):
        noise_g("dance", 0.3, 0.5, 0.4)


def test_per_step_std_tables_from_spec() -> None:
    # Flow-GRPO, SD3 schedule T=10, a=0.7 (spec 2.2, derived): 0.70, 0.74, 0.54, ..., 0.006; first exactly a
    sigmas = sd3_sigmas(10, 3.0, dtype=torch.float64)
    g = flow_grpo_g(0.7, sigmas[:-1], sigmas[1:])  # [10]
    std = g * (sigmas[:-1] - sigmas[1:]).sqrt()  # [10]
    expected = torch.tensor([0.70, 0.74, 0.54, 0.45, 0.39, 0.35, 0.32, 0.28, 0.23, 0.006], dtype=torch.float64)
    torch.testing.assert_close(std, expected, rtol=0, atol=0.006)
    assert abs(std[0].item() - 0.7) < 1e-12
    # DanceGRPO FLUX T=16, eta=0.3: 0.3 * sqrt(1 - 0.9783) = 0.044, 0.3 * sqrt(0.1667) = 0.122 (spec 1.2)
    sigmas = flux_sigmas(16, 3.0, dtype=torch.float64)
    std = constant_g(0.3, sigmas[:-1], sigmas[1:]) * (sigmas[:-1] - sigmas[1:]).sqrt()
    assert abs(std[0].item() - 0.044) < 5e-4 and abs(std[-1].item() - 0.122) < 5e-4


# ---------------------------------------------------------------- sde_step


def test_sde_mean_with_zero_g_is_euler() -> None:
    x, v = _latents(0), _latents(1)
    per_sample = (torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.7, 0.4, 0.0]))
    for sigma, sigma_next in ((1.0, 0.97), (0.5, 0.4), per_sample):
        out = sde_step(x, v, sigma, sigma_next, 0.0)
        assert torch.equal(out.mean, euler_step(x, v, sigma, sigma_next))
        assert torch.equal(out.x_next, out.mean) and out.log_prob is None
        assert torch.equal(out.std, torch.zeros(4))


def test_sde_mean_matches_spec_expanded_form() -> None:
    # spec 0: mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
    x, v = _latents(0, dtype=torch.float64), _latents(1, dtype=torch.float64)
    sigma, sigma_next, g = 0.6, 0.5, 0.7
    dt = sigma_next - sigma
    expected = x * (1 + g**2 * dt / (2 * sigma)) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
    out = sde_step(x, v, sigma, sigma_next, g, noise=torch.zeros_like(x))
    torch.testing.assert_close(out.mean, expected)
    torch.testing.assert_close(out.std, torch.full((4,), 0.7 * math.sqrt(0.1), dtype=torch.float64))


@pytest.mark.parametrize("kind, level", [("constant", 0.3), ("flow", 0.7)])
def test_rescoring_is_bit_identical(kind: str, level: float) -> None:
    # rows sit at different steps of the FLUX grid, including the first (sigma = 1) and last (sigma_next = 0)
    sigmas = flux_sigmas(16, 3.0)
    index = torch.tensor([0, 5, 11, 15])
    sigma, sigma_next = sigmas[index], sigmas[index + 1]  # [4], [4]
    g = noise_g(kind, level, sigma, sigma_next)  # [4]
    x, v = _latents(0), _latents(1)
    drawn = sde_step(x, v, sigma, sigma_next, g, generator=torch.Generator().manual_seed(7))
    rescored = sde_step(x, v, sigma, sigma_next, g, x_next=drawn.x_next)
    assert torch.isfinite(drawn.log_prob).all() and (drawn.std > 0).all()
    assert torch.equal(rescored.log_prob, drawn.log_prob)  # ratio exp(0) == 1 exactly
    assert torch.equal(rescored.mean, drawn.mean)
    # and the log-prob is the Gaussian density under the std the sample was drawn with
    torch.testing.assert_close(drawn.log_prob, gaussian_log_prob(drawn.x_next, drawn.mean, drawn.std))
    # same generator seed -> same sample
    again = sde_step(x, v, sigma, sigma_next, g, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.x_next, drawn.x_next)


def test_first_flow_grpo_step_is_finite_with_std_a() -> None:
    sigmas = flux_sigmas(16, 3.0)
    g = flow_grpo_g(0.7, sigmas[0], sigmas[1])  # sigma = 1: 0.7 / sqrt(1 - 0.9783)
    out = sde_step(_latents(0), _latents(1), sigmas[0], sigmas[1], g, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.std, torch.full((4,), 0.7))
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_prob).all()


def test_noise_scale_given_noise_and_mixed_zero_std() -> None:
    x, v, noise = _latents(0), _latents(1), _latents(2)
    # BranchGRPO split: std = 4 * 0.3 * sqrt(0.1) and the log-prob uses that same std (bug B1 fixed)
    out = sde_step(x, v, 0.5, 0.4, 0.3, noise_scale=4.0, noise=noise)
    std = 4 * 0.3 * math.sqrt(0.1)
    torch.testing.assert_close(out.std, torch.full((4,), std))
    torch.testing.assert_close(out.x_next, out.mean + std * noise)
    torch.testing.assert_close(out.log_prob, gaussian_log_prob(out.x_next, out.mean, std))
    # per-sample g with some ODE rows: those rows are deterministic and get log_prob 0, the rest are finite
    mixed = sde_step(x, v, 0.5, 0.4, torch.tensor([0.0, 0.3, 0.0, 0.7]), noise=noise)
    assert torch.equal(mixed.x_next[0], mixed.mean[0]) and mixed.log_prob[0] == 0 and mixed.log_prob[2] == 0
    assert torch.isfinite(mixed.log_prob).all()
    summed = sde_step(x, v, 0.5, 0.4, 0.3, x_next=out.x_next, reduce="sum")
    torch.testing.assert_close(summed.log_prob, gaussian_log_prob(out.x_next, summed.mean, 0.3 * math.sqrt(0.1), "sum"))


def test_low_precision_inputs_are_upcast() -> None:
    x, v = _latents(0, dtype=torch.bfloat16), _latents(1, dtype=torch.bfloat16)
    out = sde_step(x, v, 0.5, 0.4, 0.3, generator=torch.Generator().manual_seed(0))
    assert out.x_next.dtype == out.mean.dtype == out.log_prob.dtype == torch.float32
    assert torch.equal(sde_step(x, v, 0.5, 0.4, 0.3, x_next=out.x_next).log_prob, out.log_prob)


# ---------------------------------------------------------------- coefficient-preserving sampling (CPS)


def flow_grpo_cps_reference(model_output, sample, sigma, sigma_prev, noise_level, variance_noise=None, prev_sample=None):
    """Flow-GRPO's ``sde_step_with_logprob`` with ``sde_type="cps"`` (yifan123/flow_grpo,
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), restated: sigmas ``[B, 1, ...]``, the log-prob with every
    constant dropped (``-(x' - mean)^2``, averaged over the non-batch dims). Returns (x', log_prob, mean, std_dev_t)."""
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)  # the paper's sigma_t
    x0_hat = sample - sigma * model_output  # the predicted data
    x1_hat = sample + (1 - sigma) * model_output  # the predicted noise
    mean = (1 - sigma_prev) * x0_hat + torch.sqrt(sigma_prev**2 - std_dev_t**2) * x1_hat
    if prev_sample is None:
        prev_sample = mean + std_dev_t * variance_noise
    log_prob = -((prev_sample - mean) ** 2)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std_dev_t


def test_cps_step_equals_the_flow_grpo_reference_on_random_tensors() -> None:
    # float64, per-sample steps of the SD3 grid (T = 10, shift 3) as Flow-GRPO's rollouts use them, eta 0.8
    sigmas = sd3_sigmas(10, 3.0, dtype=torch.float64)
    index = torch.tensor([0, 3, 6, 8])
    sigma, sigma_next = sigmas[index], sigmas[index + 1]  # [4]
    x, v, z = (_latents(seed, dtype=torch.float64) for seed in (0, 1, 2))  # [4, 2, 3, 5]
    g = noise_g("cps", 0.8, sigma, sigma_next)  # [4]
    out = sde_step(x, v, sigma, sigma_next, g, sde_type="cps", noise=z)
    ref_x, ref_log_prob, ref_mean, ref_std = flow_grpo_cps_reference(v, x, sigma.view(-1, 1, 1, 1),
                                                                     sigma_next.view(-1, 1, 1, 1), 0.8, variance_noise=z)
    torch.testing.assert_close(out.mean, ref_mean, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.x_next, ref_x, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.std, ref_std.flatten(), rtol=1e-12, atol=0)
    # the reference drops the Gaussian's normalisation; flowgrove's log-prob is the exact density under that std:
    # mean over dims of -(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)
    exact = ref_log_prob / (2 * ref_std.flatten() ** 2) - ref_std.flatten().log() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob, exact, rtol=1e-9, atol=1e-9)
    scale = ref_std.view(-1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(out.log_prob, Normal(ref_mean, scale).log_prob(ref_x).mean(dim=(1, 2, 3)))
    # re-scoring a stored sample with other weights: the reference's mean again, the exact density of that sample
    v2 = _latents(3, dtype=torch.float64)
    again = sde_step(x, v2, sigma, sigma_next, g, sde_type="cps", x_next=out.x_next)
    _, ref_log_prob2, ref_mean2, _ = flow_grpo_cps_reference(v2, x, sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1),
                                                             0.8, prev_sample=out.x_next)
    torch.testing.assert_close(again.mean, ref_mean2, rtol=1e-6, atol=1e-12)
    exact2 = ref_log_prob2 / (2 * ref_std.flatten() ** 2) - ref_std.flatten().log() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(again.log_prob, exact2, rtol=1e-9, atol=1e-9)


def test_cps_rescoring_is_bit_identical_and_its_last_step_is_euler() -> None:
    sigmas = flux_sigmas(16, 3.0)
    index = torch.tensor([0, 5, 11, 15])  # the last row steps onto sigma 0, where CPS draws no noise
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    g = noise_g("cps", 0.8, sigma, sigma_next)
    x, v = _latents(0), _latents(1)
    drawn = sde_step(x, v, sigma, sigma_next, g, sde_type="cps", generator=torch.Generator().manual_seed(7))
    rescored = sde_step(x, v, sigma, sigma_next, g, sde_type="cps", x_next=drawn.x_next)
    assert torch.equal(rescored.log_prob, drawn.log_prob) and torch.equal(rescored.mean, drawn.mean)
    assert (drawn.std[:3] > 0).all() and drawn.std[3] == 0 and drawn.log_prob[3] == 0
    torch.testing.assert_close(drawn.x_next[3], euler_step(x, v, sigma, sigma_next)[3])  # x0_pred at sigma 0
    # an eta of 0 is the Euler step: the data coefficient 1 - s', the noise coefficient s' (x0 + v = eps)
    ode = sde_step(x, v, sigma, sigma_next, noise_g("cps", 0.0, sigma, sigma_next), sde_type="cps")
    torch.testing.assert_close(ode.mean, euler_step(x, v, sigma, sigma_next))
    assert ode.log_prob is None


def test_cps_split_draws_a_larger_fraction_and_keeps_the_coefficients() -> None:
    # a split child (noise_scale 2, eta 0.3: fraction 2 * sin(0.15 pi) = 0.908) is the CPS step with that fraction
    x, v, z = _latents(0, dtype=torch.float64), _latents(1, dtype=torch.float64), _latents(2, dtype=torch.float64)
    g = float(noise_g("cps", 0.3, 0.6, 0.5))
    split = sde_step(x, v, 0.6, 0.5, g, sde_type="cps", noise_scale=2.0, noise=z)
    direct = sde_step(x, v, 0.6, 0.5, 2 * g, sde_type="cps", noise=z)
    torch.testing.assert_close(split.x_next, direct.x_next, rtol=0, atol=1e-12)
    torch.testing.assert_close(split.std, torch.full((4,), 2 * g * 0.5, dtype=torch.float64))
    torch.testing.assert_close(split.log_prob, gaussian_log_prob(split.x_next, split.mean, split.std))
    # a fraction of exactly 1 keeps none of the old noise: the mean is (1 - s') x0_pred
    full = sde_step(x, v, 0.6, 0.5, 1.0, sde_type="cps", noise=z)
    torch.testing.assert_close(full.mean, 0.5 * x0_from_velocity(x, v, 0.6))


def test_unknown_sde_type_is_refused() -> None:
    with pytest.raises(ValueError, match="sde_type 'ddim'.*cps"):
        sde_step(_latents(0), _latents(1), 0.5, 0.4, 0.3, sde_type="ddim")


def test_flow_forward_process_equals_diffusers_scale_noise() -> None:
    # x_sigma = (1 - sigma) x0 + sigma noise at every sigma of FlowMatchEulerDiscreteScheduler's grid; target noise - x0
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 4, 3, 3, generator=gen), torch.randn(1, 4, 3, 3, generator=gen)
    for i, t in enumerate(sched.timesteps):
        expected = sched.scale_noise(x0, t[None], noise)  # the sigma of timestep t
        torch.testing.assert_close(add_noise(x0, noise, sched.sigmas[i]), expected)
    torch.testing.assert_close(velocity_target(x0, noise, 0.3), noise - x0)
