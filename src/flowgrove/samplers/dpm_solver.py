"""DPM-Solver++(2M) in rectified-flow variables, for deterministic ODE segments (Lu et al. 2022; MixGRPO-Flash).

``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``, data prediction ``D = x0_pred = x - sigma * v``.
Exponentials of step sizes are written as ratios of alphas and sigmas, so sigma = 1 (lambda = -inf)
and sigma_next = 0 (lambda = +inf) never produce inf or nan.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowgrove.samplers.steps import Scalar, _bcast, euler_step, x0_from_velocity

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], sigma 0-dim) -> velocity [B, ...]


def _log_snr(sigma: Tensor) -> Tensor:
    """``lambda = log((1 - sigma) / sigma)``; only called where 0 < sigma < 1."""
    return torch.log1p(-sigma) - torch.log(sigma)


def dpmpp_2m_step(
    x: Tensor,
    x0_pred: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    prev_x0_pred: Tensor | None = None,
    prev_sigma: Scalar | None = None,
    *,
    monotone: bool = False,
) -> Tensor:
    """One DPM-Solver++(2M) midpoint step (Lu et al. 2022, "DPM-Solver++"; MixGRPO ``dpm_step``).

    First order (DDIM, equal to the Euler step):
    ``x_t = (sigma_t/sigma_s) * x - alpha_t * (e^{-h} - 1) * D0`` with
    ``alpha_t * e^{-h} = alpha_s * sigma_t / sigma_s``, i.e. ``x_t = (sigma_t/sigma_s) x + (1 - sigma_t/sigma_s) D0``.
    Second order adds ``-1/2 * alpha_t * (e^{-h} - 1) * D1`` with ``D1 = (D0 - D_prev) / r0``,
    ``r0 = h0 / h``, ``h = lambda_t - lambda_s``, ``h0 = lambda_s - lambda_prev``. It is used only when
    the history is given, ``prev_sigma < 1`` (else ``h0`` is infinite) and ``sigma_next > 0``
    (``lower_order_final``; then the step returns ``x0_pred`` exactly).

    Args:
        x: Latents ``[B, ...]`` at ``sigma``.
        x0_pred: Data prediction ``[B, ...]`` at ``(x, sigma)``.
        sigma: Current noise level in (0, 1], scalar or ``[B]``.
        sigma_next: Next noise level in [0, sigma), scalar or ``[B]``.
        prev_x0_pred: Data prediction ``[B, ...]`` of the previous step, or None.
        prev_sigma: Noise level of the previous step, or None.
        monotone: Take the second-order correction only where it leaves ``prev_x0_pred`` a nonnegative net weight
            in the result, counting the weight ``1 - sigma / prev_sigma`` of its own first-order step:
            ``(t/s) * (1 - s/p) >= c1 / (2 * r0)``. Else the row steps first order. Plain 2M extrapolates
            ``D0 + (D0 - D_prev) / (2 r0)``; where a step is much longer in lambda than the one before it (small
            ``r0``: a compressed tail after uncompressed steps) that gives ``D_prev`` a negative weight in the sample,
            so any change of the model's prediction there moves the sample the other way. Rollouts whose
            deterministic tail follows trained steps use it (see ``rollout``); plain sampling does not.

    Returns:
        Latents ``[B, ...]`` at ``sigma_next``.
    """
    s, t = _bcast(sigma, x), _bcast(sigma_next, x)  # [B, 1, ...]
    c1 = 1 - t / s  # = -alpha_t * (e^{-h} - 1)
    x_next = (t / s) * x + c1 * x0_pred  # [B, ...] first order
    if prev_x0_pred is None or prev_sigma is None:
        return x_next
    p = _bcast(prev_sigma, x)  # [B, 1, ...]
    second = (p < 1) & (t > 0)  # [B, 1, ...]
    if not bool(second.any()):
        return x_next
    # rows that stay first order get dummy sigmas 0.75 > 0.5 > 0.25 so every lambda below is finite
    p, s, t = (torch.where(second, v, torch.full_like(v, d)) for v, d in ((p, 0.75), (s, 0.5), (t, 0.25)))
    lambda_p, lambda_s, lambda_t = _log_snr(p), _log_snr(s), _log_snr(t)  # [B, 1, ...]
    r0 = (lambda_s - lambda_p) / (lambda_t - lambda_s)  # [B, 1, ...] h0 / h
    if monotone:  # the history keeps a nonnegative weight: (t/s) * (1 - s/p) - c1 / (2 r0) >= 0
        second = second & ((t / s) * (1 - s / p) >= (1 - t / s) / (2 * r0))  # [B, 1, ...]
    d1 = (x0_pred - prev_x0_pred) / r0  # [B, ...]
    return x_next + torch.where(second, 0.5 * c1 * d1, torch.zeros_like(d1))  # [B, ...]


def sample_dpmpp_2m(velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic DPM-Solver++(2M) sampler over a sigma grid (Lu et al. 2022; k-diffusion ``sample_dpmpp_2m``).

    Args:
        velocity_fn: ``velocity_fn(x, sigma) -> v`` with ``x [B, ...]`` and a 0-dim ``sigma``.
        x: Starting latents ``[B, ...]`` at ``sigmas[0]``.
        sigmas: Decreasing grid ``[N + 1]``.

    Returns:
        Latents ``[B, ...]`` at ``sigmas[-1]``.
    """
    prev_x0_pred, prev_sigma = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0_pred = x0_from_velocity(x, velocity_fn(x, sigma), sigma)  # [B, ...]
        x = dpmpp_2m_step(x, x0_pred, sigma, sigma_next, prev_x0_pred, prev_sigma)  # [B, ...]
        prev_x0_pred, prev_sigma = x0_pred, sigma
    return x


def sample_euler(velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor) -> Tensor:
    """Euler ODE sampler over a sigma grid (Karras et al. 2022, Algorithm 2 without churn).

    Args:
        velocity_fn: ``velocity_fn(x, sigma) -> v`` with ``x [B, ...]`` and a 0-dim ``sigma``.
        x: Starting latents ``[B, ...]`` at ``sigmas[0]``.
        sigmas: Decreasing grid ``[N + 1]``.

    Returns:
        Latents ``[B, ...]`` at ``sigmas[-1]``.
    """
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, velocity_fn(x, sigma), sigma, sigma_next)  # [B, ...]
    return x
