"""DPM-Solver++(2M) against the exact probability-flow ODE of 1-D Gaussian data (float64).

For x0 ~ N(m, s^2) the exact velocity is v*(x, sigma) = (sigma - (1-sigma) s^2) / V * (x - (1-sigma) m) - m with
V = (1-sigma)^2 s^2 + sigma^2 (derivation in test_marginals.py). Along the ODE dx/dsigma = v*, the standardized
value z = (x - (1-sigma) m) / sqrt(V) is constant:
    d/dsigma (x - (1-sigma) m) = v* + m = (sigma - (1-sigma) s^2) / V * (x - (1-sigma) m)
    d/dsigma log sqrt(V) = (sigma - (1-sigma) s^2) / V
so the exact flow map from sigma = 1 (V = 1, mean 0) to sigma = 0 is x_1 -> m + s * x_1.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowgrove.samplers import dpmpp_2m_step, euler_step, sample_dpmpp_2m, sample_euler, x0_from_velocity
from flowgrove.samplers.schedules import flux_sigmas

M, S = 0.7, 0.4


# Copied from tests/test_marginals.py::gaussian_velocity
def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor | float, m: float = M, s: float = S) -> torch.Tensor:
    """Exact v*(x, sigma) for x0 ~ N(m, s^2)."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    return (sigma - (1 - sigma) * s**2) / var * (x - (1 - sigma) * m) - m


NOISE = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]  # [61, 1] starting points at sigma 1
EXACT = M + S * NOISE  # [61, 1] exact ODE solution at sigma 0


def _slope(xs: list[float], ys: list[float]) -> float:
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    return (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()


def max_errors(sampler, shift: float, steps: tuple[int, ...]) -> list[float]:
    grids = [flux_sigmas(n, shift, dtype=torch.float64) for n in steps]
    return [(sampler(gaussian_velocity, NOISE.clone(), grid) - EXACT).abs().max().item() for grid in grids]


# Grids that end at sigma = 0 (lambda = +inf) make the last DPM steps O(1) in lambda: step k from the end has
# h ~ 1/k and contributes ~1/(k N^2), so the 2M error is ~ log(N) / N^2 (checked against diffusers'
# DPMSolverMultistepScheduler(use_flow_sigmas=True, solver_type="midpoint") to 5e-7 while writing this test).
# The order is therefore fitted on log(error / log N). The shift-3 grid is ~2x coarser near sigma ~ 0.3, where
# this data's x0 prediction changes fastest, so it reaches the asymptotic regime at larger N.
ORDER_STEPS = {1.0: (32, 64, 128, 256), 3.0: (128, 256, 512, 1024)}


def test_dpmpp_2m_is_second_order_and_euler_first_order() -> None:
    for shift, steps in ORDER_STEPS.items():
        log_n = [math.log(n) for n in steps]
        errors_dpm = max_errors(sample_dpmpp_2m, shift, steps)
        errors_euler = max_errors(sample_euler, shift, steps)
        order_dpm = -_slope(log_n, [math.log(e / ln) for e, ln in zip(errors_dpm, log_n)])
        order_euler = -_slope(log_n, [math.log(e) for e in errors_euler])
        # observed (m=0.7, s=0.4): dpm 1.83 (shift 1), 1.78 (shift 3); euler 0.99, 0.99
        assert 1.7 < order_dpm < 2.5, (shift, order_dpm, errors_dpm)
        assert 0.9 < order_euler < 1.1, (shift, order_euler, errors_euler)
        assert errors_dpm[-1] < errors_euler[-1] / 10


def test_constant_velocity_ends_at_x_minus_v() -> None:
    # v = c everywhere: the ODE is x(sigma) = x(1) - (1 - sigma) c, so x(0) = x(1) - c; D = x - sigma c is
    # the same for every step, so D1 = 0 and every DPM step (first or second order) is exact.
    x = torch.tensor([[0.3], [-1.2]], dtype=torch.float64)
    c = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    for n in (3, 7):
        out = sample_dpmpp_2m(lambda x_, sigma: c, x, flux_sigmas(n, 3.0, dtype=torch.float64))
        torch.testing.assert_close(out, x - c, rtol=0, atol=1e-12)


def test_final_step_returns_x0_pred_exactly() -> None:
    x, x0_pred, prev = torch.randn(3, 2, 4, 4, dtype=torch.float64).unbind(0)
    # lower_order_final: sigma_next = 0 ignores the history and returns x0_pred bit for bit
    assert torch.equal(dpmpp_2m_step(x, x0_pred, 0.2, 0.0, prev_x0_pred=prev, prev_sigma=0.4), x0_pred)
    assert torch.equal(dpmpp_2m_step(x, x0_pred, 0.2, 0.0), x0_pred)


def test_first_order_step_equals_euler() -> None:
    x, velocity, prev = torch.randn(3, 2, 4, 4, dtype=torch.float64).unbind(0)
    for sigma, sigma_next in ((1.0, 0.9), (0.6, 0.45), (0.3, 0.1)):
        x0_pred = x0_from_velocity(x, velocity, sigma)
        expected = euler_step(x, velocity, sigma, sigma_next)
        torch.testing.assert_close(dpmpp_2m_step(x, x0_pred, sigma, sigma_next), expected, rtol=0, atol=1e-12)
    # history from the pure-noise point (prev_sigma = 1, h0 infinite) also falls back to first order
    x0_pred = x0_from_velocity(x, velocity, 0.9)
    step = dpmpp_2m_step(x, x0_pred, 0.9, 0.8, prev_x0_pred=prev, prev_sigma=1.0)
    torch.testing.assert_close(step, euler_step(x, velocity, 0.9, 0.8), rtol=0, atol=1e-12)
    assert torch.isfinite(step).all()


def test_second_order_step_by_hand() -> None:
    # sigma_prev = 0.8, sigma = 0.5, sigma_next = 0.2 (alpha = 1 - sigma):
    # lambda = log(alpha / sigma): lambda_prev = log(0.25), lambda_s = log(1) = 0, lambda_t = log(4)
    # h = log 4, h0 = 0 - log 0.25 = log 4, r0 = 1; e^{-h} = 1/4
    # x_t = (0.2/0.5) x - 0.8 (1/4 - 1) D0 - 0.5 * 0.8 (1/4 - 1) (D0 - D_prev)
    #     = 0.4 x + 0.6 D0 + 0.3 (D0 - D_prev)
    x, d0, d_prev = (torch.tensor([v], dtype=torch.float64) for v in (1.0, 2.0, 3.0))
    out = dpmpp_2m_step(x, d0, 0.5, 0.2, prev_x0_pred=d_prev, prev_sigma=0.8)
    # 0.4 * 1 + 0.6 * 2 + 0.3 * (2 - 3) = 0.4 + 1.2 - 0.3 = 1.3
    torch.testing.assert_close(out, torch.tensor([1.3], dtype=torch.float64), rtol=0, atol=1e-12)


def test_per_sample_sigmas_match_scalar_steps() -> None:
    x, x0_pred, prev = torch.randn(3, 2, 3, dtype=torch.float64).unbind(0)  # [2, 3] each
    sigma = torch.tensor([0.5, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.2, 0.0], dtype=torch.float64)
    prev_sigma = torch.tensor([0.8, 0.6], dtype=torch.float64)
    out = dpmpp_2m_step(x, x0_pred, sigma, sigma_next, prev, prev_sigma)
    for b in range(2):
        row = dpmpp_2m_step(x[b : b + 1], x0_pred[b : b + 1], sigma[b], sigma_next[b], prev[b : b + 1], prev_sigma[b])
        torch.testing.assert_close(out[b : b + 1], row, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy-2 notice inside diffusers
def test_matches_diffusers_dpm_solver_multistep() -> None:
    # Independent reference: diffusers' DPM-Solver++(2M) midpoint with flow sigmas (alpha = 1 - sigma),
    # lower_order_final, terminal sigma 0. diffusers works in float32, hence atol 1e-5.
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(20)
    sigmas = scheduler.sigmas.to(torch.float64)  # [21], starts just below 1, ends at 0
    x_ref = NOISE.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x_ref = scheduler.step(gaussian_velocity(x_ref, sigmas[i]), timestep, x_ref).prev_sample
    out = sample_dpmpp_2m(gaussian_velocity, NOISE.clone(), sigmas)
    torch.testing.assert_close(out, x_ref.to(torch.float64), rtol=0, atol=1e-5)
