"""The SDE samplers keep the probability-flow ODE's marginals (checked on 1-D Gaussian data, float64).

Data x0 ~ N(m, s^2), noise eps ~ N(0, 1), x = (1 - sigma) x0 + sigma eps. Then (x0, eps, x) is jointly
Gaussian with
    E[x] = (1 - sigma) m,  V(sigma) := Var[x] = (1 - sigma)^2 s^2 + sigma^2,
    Cov[x0, x] = (1 - sigma) s^2,  Cov[eps, x] = sigma,
so the conditional means are linear in x:
    E[x0 | x] = m + (1 - sigma) s^2 / V * (x - (1 - sigma) m)
    E[eps | x] =          sigma / V * (x - (1 - sigma) m)
and the exact rectified-flow velocity is
    v*(x, sigma) = E[eps - x0 | x] = (sigma - (1 - sigma) s^2) / V * (x - (1 - sigma) m) - m.
The marginal at sigma is N((1 - sigma) m, V(sigma)); at sigma = 1 it is N(0, 1), at 0 it is N(m, s^2).
"""

from __future__ import annotations

import pytest
import torch

from flowgrove.samplers import euler_step, noise_g, sde_step, sde_type_of
from flowgrove.samplers.schedules import flux_sigmas

M, S = 0.7, 0.4
NUM_SAMPLES = 50_000
NUM_STEPS = 200


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor | float, m: float = M, s: float = S) -> torch.Tensor:
    """Exact v*(x, sigma) for x0 ~ N(m, s^2) (derivation in the module docstring)."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    return (sigma - (1 - sigma) * s**2) / var * (x - (1 - sigma) * m) - m


def run_sampler(kind: str | None, level: float, shift: float, check_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples at sigmas[check_index] and at sigma 0; kind None = Euler ODE."""
    generator = torch.Generator().manual_seed(0)
    sigmas = flux_sigmas(NUM_STEPS, shift, dtype=torch.float64)
    x = torch.randn(NUM_SAMPLES, 1, generator=generator, dtype=torch.float64)  # [N, 1] at sigma 1
    intermediate = x
    for i in range(NUM_STEPS):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity = gaussian_velocity(x, sigma)
        if kind is None:
            x = euler_step(x, velocity, sigma, sigma_next)
        else:
            g = noise_g(kind, level, sigma, sigma_next)  # Flow-GRPO: first-step guard keeps g finite at sigma 1
            x = sde_step(x, velocity, sigma, sigma_next, g, generator=generator).x_next
        if i + 1 == check_index:
            intermediate = x
    return intermediate, x


@pytest.fixture(autouse=True)
def _single_thread():
    # ~1000 small ops on 50k-element tensors: intra-op threads only add barrier waits, and on a busy
    # 2-core machine they made this file 30x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tolerance: the sampling error of the mean is s / sqrt(N) = 0.4 / 224 = 0.0018 and of the std about
# s / sqrt(2N) = 0.0013; the Euler / Euler-Maruyama bias with 200 steps is O(1/200) = 0.005.
# Observed errors are <= 0.006 (seed 0). Dropping the score correction with eta = 0.3 would add
# variance ~eta^2 = 0.09, i.e. std 0.5 instead of 0.4, far outside the tolerance.
TOL = 0.012


@pytest.mark.parametrize(
    "kind, level, shift",
    [
        (None, 0.0, 1.0),  # Euler ODE
        (None, 0.0, 3.0),
        ("constant", 0.3, 3.0),  # DanceGRPO FLUX setting
        ("constant", 1.0, 1.0),  # a much noisier constant g
        ("flow", 0.7, 3.0),  # Flow-GRPO / MixGRPO setting
        ("flow", 0.7, 1.0),
    ],
)
def test_sde_keeps_ode_marginals(kind: str | None, level: float, shift: float) -> None:
    check_index = NUM_STEPS // 2
    sigma_mid = float(flux_sigmas(NUM_STEPS, shift, dtype=torch.float64)[check_index])
    mid, final = run_sampler(kind, level, shift, check_index)
    # final marginal N(m, s^2) = N(0.7, 0.16)
    assert abs(final.mean().item() - M) < TOL
    assert abs(final.std().item() - S) < TOL
    # intermediate marginal N((1 - sigma) m, (1 - sigma)^2 s^2 + sigma^2)
    assert abs(mid.mean().item() - (1 - sigma_mid) * M) < TOL
    expected_std = ((1 - sigma_mid) ** 2 * S**2 + sigma_mid**2) ** 0.5
    assert abs(mid.std().item() - expected_std) < TOL


# ---------------------------------------------------------------- one step from an exact flow sample
# A point mass x0 = c: then x = (1 - s) c + s eps exactly and the exact velocity is v*(x) = eps - c = (x - c) / s.
# A step is affine in (eps, z): x' = A + B eps + C z with eps, z independent N(0, 1), so x' ~ N(A, B^2 + C^2); the
# flow's marginal at s' is N((1 - s') c, s'^2). A, B and C are read off three exact evaluations (float64).

C0 = 0.7


def _one_step(kind: str, level: float, sigma: float, sigma_next: float) -> tuple[float, float]:
    """(mean, variance) of x' after one step of noise ``kind`` from x = (1 - sigma) c + sigma eps."""
    eps = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)  # rows: (eps, z) = (0, 0), (1, 0), (0, 1)
    z = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
    x = (1 - sigma) * C0 + sigma * eps  # [3, 1]
    velocity = (x - C0) / sigma  # exact for the point mass
    g = noise_g(kind, level, sigma, sigma_next)
    out = sde_step(x, velocity, sigma, sigma_next, g, sde_type=sde_type_of(kind), noise=z).x_next.flatten()
    a, b, c = out[0].item(), (out[1] - out[0]).item(), (out[2] - out[0]).item()
    return a, b**2 + c**2


@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.97), (0.9, 0.6), (0.6, 0.5), (0.2, 0.05)])
def test_cps_step_keeps_the_flow_marginal_for_any_level(level: float, sigma: float, sigma_next: float) -> None:
    mean, var = _one_step("cps", level, sigma, sigma_next)
    assert abs(mean - (1 - sigma_next) * C0) < 1e-12
    assert abs(var - sigma_next**2) < 1e-12


@pytest.mark.parametrize("kind, level, sigma, sigma_next, at_least",
                         [("constant", 0.3, 0.6, 0.5, 1e-3),  # DanceGRPO: c^2 + std^2 = 0.25156 instead of 0.25
                          ("constant", 1.0, 0.9, 0.6, 0.02),
                          ("flow", 0.7, 0.9, 0.6, 0.5)])  # Flow-GRPO's big early steps: 1.341 instead of 0.36
def test_euler_maruyama_step_does_not_keep_it(kind: str, level: float, sigma: float, sigma_next: float,
                                              at_least: float) -> None:
    # The mean is right ((1 - s') c: the score term only moves the noise part); the variance is not, because the
    # step keeps s' - std^2 / (2 s) of the old noise where CPS keeps sqrt(s'^2 - std^2).
    mean, var = _one_step(kind, level, sigma, sigma_next)
    assert abs(mean - (1 - sigma_next) * C0) < 1e-12
    assert abs(var - sigma_next**2) > at_least
