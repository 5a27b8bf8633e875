"""Rectified-flow sampler steps: Euler ODE and the common reverse-SDE family (spec section 0).

Conventions: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, velocity ``v = noise - x0``,
``dt = sigma_next - sigma < 0``. ``sigma``, ``sigma_next``, ``g`` and ``noise_scale`` may be python
floats, 0-dim tensors or per-sample ``[B]`` tensors (a micro-batch may mix steps).

One stochastic step, two SDE types (Flow-GRPO's ``sde_type``): ``"sde"``, the Euler-Maruyama step of the reverse
SDE with the ODE's marginals, and ``"cps"``, the coefficient-preserving step. In terms of the predictions
``x0 = x - sigma * v`` and ``eps = x + (1 - sigma) * v`` both draw ``x_next = (1 - sigma_next) * x0 + c * eps + std * z``:
the Euler-Maruyama step has ``c = sigma_next - std_g^2 / (2 sigma)`` (``std_g = g * sqrt(sigma - sigma_next)``), a
first-order approximation of CPS's ``c = sqrt(sigma_next^2 - std^2)``, which keeps the total noise coefficient
``sqrt(c^2 + std^2)`` at exactly ``sigma_next`` (Wang & Yu 2025).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowgrove.samplers.gaussian import gaussian_log_prob
from flowgrove.samplers.types import StepOutput

Scalar = float | Tensor


def _per_sample(value: Scalar, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` as a ``[B]`` tensor on ``x``'s device (dtype ``dtype`` or ``x.dtype``)."""
    value = torch.as_tensor(value, dtype=dtype or x.dtype, device=x.device)
    if value.ndim == 0:
        return value.expand(x.shape[0])  # [B]
    if value.shape != (x.shape[0],):
        raise ValueError(f"per-sample values must have shape [B]={x.shape[0]}, got {tuple(value.shape)}.")
    return value  # [B]


def _bcast(value: Scalar, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` shaped ``[B, 1, ...]`` to broadcast against ``x`` ``[B, ...]``."""
    return _per_sample(value, x, dtype).view(-1, *([1] * (x.ndim - 1)))  # [B, 1, ...]


def _as_float(value: Scalar) -> Tensor:
    value = torch.as_tensor(value)
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())


def x0_from_velocity(x: Tensor, velocity: Tensor, sigma: Scalar) -> Tensor:
    """Data prediction ``x0_pred = x - sigma * v`` (rectified flow, Liu et al. 2023).

    Args:
        x: Latents ``[B, ...]`` at ``sigma``.
        velocity: Predicted velocity ``[B, ...]``.
        sigma: Noise level, scalar or ``[B]``.

    Returns:
        ``x0_pred`` ``[B, ...]``.
    """
    return x - _bcast(sigma, x) * velocity  # [B, ...]


def add_noise(x0: Tensor, noise: Tensor, sigma: Scalar) -> Tensor:
    """The forward process ``x_sigma = (1 - sigma) * x0 + sigma * noise`` (rectified flow; diffusers ``scale_noise``).

    Args:
        x0: Clean latents ``[B, ...]``.
        noise: Standard normal noise ``[B, ...]``.
        sigma: Noise level, scalar or ``[B]``.

    Returns:
        ``x_sigma`` ``[B, ...]``.
    """
    s = _bcast(sigma, x0)  # [B, 1, ...]
    return (1 - s) * x0 + s * noise  # [B, ...]


def velocity_target(x0: Tensor, noise: Tensor, sigma: Scalar) -> Tensor:
    """The flow-matching regression target ``v = noise - x0`` at any ``sigma`` (the velocity of the forward path).

    Args:
        x0: Clean latents ``[B, ...]``.
        noise: The noise ``[B, ...]`` of :func:`add_noise`.
        sigma: Unused; kept for the common target signature of the step families.

    Returns:
        The target ``[B, ...]``.
    """
    return noise - x0  # [B, ...]


def euler_step(x: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Euler step of the probability-flow ODE ``x + (sigma_next - sigma) * v`` (rectified flow).

    Args:
        x: Latents ``[B, ...]`` at ``sigma``.
        velocity: Predicted velocity ``[B, ...]``.
        sigma: Current noise level, scalar or ``[B]``.
        sigma_next: Next noise level, scalar or ``[B]``.

    Returns:
        Latents ``[B, ...]`` at ``sigma_next``.
    """
    return x + (_bcast(sigma_next, x) - _bcast(sigma, x)) * velocity  # [B, ...]


def constant_g(eta: float, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Constant diffusion coefficient ``g = eta`` (DanceGRPO / BranchGRPO ``flux_step``).

    Args:
        eta: Noise level ``eta`` (0.3 for FLUX).
        sigma: Current noise level, scalar or ``[B]`` (sets the output shape).
        sigma_next: Unused; kept for the common ``g`` signature.

    Returns:
        ``g`` with the shape and dtype of ``sigma``.
    """
    return torch.full_like(_as_float(sigma), eta)


def flow_grpo_g(a: float, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """``g = a * sqrt(sigma / (1 - sigma'))`` (Flow-GRPO ``sde_step_with_logprob``, Liu et al. 2025).

    ``sigma' = sigma`` except at ``sigma >= 1``, where ``sigma' = sigma_next`` (Flow-GRPO uses the
    schedule's second sigma; spec bug F2, kept because it defines the first step). There
    ``g = a / sqrt(1 - sigma_next) = a / sqrt(delta_sigma)``, so the first step's transition std
    ``g * sqrt(delta_sigma)`` is exactly ``a``.

    Args:
        a: Noise level ``a`` (0.7 in Flow-GRPO and MixGRPO).
        sigma: Current noise level, scalar or ``[B]``.
        sigma_next: Next noise level, scalar or ``[B]``.

    Returns:
        ``g`` with the broadcast shape of ``sigma`` and ``sigma_next``.
    """
    sigma, sigma_next = _as_float(sigma), _as_float(sigma_next)
    sigma_denominator = torch.where(sigma >= 1, sigma_next.to(sigma.dtype), sigma)
    return a * torch.sqrt(sigma / (1 - sigma_denominator))


def cps_g(eta: float, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """CPS's noise fraction ``g = sin(eta * pi / 2)``: the step draws ``std = g * sigma_next`` (Flow-GRPO
    ``sde_type="cps"``, ``std_dev_t = sigma_prev * sin(noise_level * pi / 2)``; Wang & Yu 2025, arXiv 2509.05952).

    ``eta`` in [0, 1]: 0 is the Euler ODE step, 1 replaces all of the sample's noise by fresh noise.

    Args:
        eta: Noise level ``eta`` (0.8 in Flow-GRPO's CPS configs).
        sigma: Current noise level, scalar or ``[B]`` (sets the output shape).
        sigma_next: Unused; kept for the common ``g`` signature.

    Returns:
        ``g`` with the shape and dtype of ``sigma``.
    """
    return torch.full_like(_as_float(sigma), math.sin(eta * math.pi / 2))


class NoiseKind(NamedTuple):
    """A ``sampler.noise`` choice: its coefficient ``g(level, sigma, sigma_next)`` and the SDE type that reads it."""

    g: Callable[[float, Scalar, Scalar], Tensor]
    sde_type: str  # a key of SDE_TYPES


NOISE_LEVELS: dict[str, NoiseKind] = {
    "constant": NoiseKind(constant_g, "sde"),  # DanceGRPO, BranchGRPO
    "flow": NoiseKind(flow_grpo_g, "sde"),  # Flow-GRPO, MixGRPO
    "cps": NoiseKind(cps_g, "cps"),  # Flow-GRPO sde_type="cps" (coefficient-preserving sampling)
}


def _noise_kind(kind: str) -> NoiseKind:
    if kind not in NOISE_LEVELS:
        raise ValueError(f"unknown noise kind {kind!r}; use one of {sorted(NOISE_LEVELS)}.")
    return NOISE_LEVELS[kind]


def noise_g(kind: str, level: float, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Diffusion coefficient ``g`` of the named family (see ``NOISE_LEVELS``).

    Args:
        kind: ``"constant"`` (DanceGRPO ``eta``), ``"flow"`` (Flow-GRPO ``a``) or ``"cps"`` (CPS ``eta``).
        level: ``eta`` or ``a``.
        sigma: Current noise level, scalar or ``[B]``.
        sigma_next: Next noise level, scalar or ``[B]``.

    Returns:
        ``g``, scalar or ``[B]``.
    """
    return _noise_kind(kind).g(level, sigma, sigma_next)


def sde_type_of(kind: str) -> str:
    """The SDE type (``"sde"`` or ``"cps"``, a key of ``SDE_TYPES``) that noise kind ``kind`` is drawn with."""
    return _noise_kind(kind).sde_type


def sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    g: Scalar,
    *,
    sde_type: str = "sde",
    noise_scale: Scalar = 1.0,
    x_next: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> StepOutput:
    """One stochastic rectified-flow step of SDE type ``sde_type`` and its exact Gaussian log-prob.

    ``"sde"``, Euler-Maruyama of the reverse SDE with the ODE's marginals (Flow-GRPO, Liu et al. 2025; DanceGRPO):
    ``mean = x + dt * (v - g^2/2 * score)``, ``score = -(x - (1 - sigma) * x0_pred) / sigma^2``,
    ``std = noise_scale * g * sqrt(sigma - sigma_next)``; ``g = 0`` gives the Euler ODE mean.
    ``"cps"``, coefficient-preserving (:func:`cps_moments`): ``std = noise_scale * g * sigma_next``.
    The log-prob is taken under the std the sample was drawn with, ``noise_scale`` included
    (fixes BranchGRPO bug B1). Everything is computed in float32 or wider (inputs are upcast).

    Args:
        x: Latents ``[B, ...]`` at ``sigma``.
        velocity: Predicted velocity ``[B, ...]``.
        sigma: Current noise level (> 0), scalar or ``[B]``.
        sigma_next: Next noise level, scalar or ``[B]``.
        g: Diffusion coefficient (see ``noise_g``), scalar or ``[B]``.
        sde_type: ``"sde"`` or ``"cps"`` (see ``SDE_TYPES``; :func:`sde_type_of` a noise kind).
        noise_scale: Extra std multiplier (BranchGRPO split steps), scalar or ``[B]``.
        x_next: A stored sample ``[B, ...]`` to re-score instead of sampling.
        noise: Standard normal noise ``[B, ...]`` to use instead of drawing it.
        generator: Generator for drawing the noise.
        reduce: ``"mean"`` or ``"sum"`` over non-batch dims for the log-prob.

    Returns:
        ``StepOutput(x_next, log_prob [B] or None when std == 0 everywhere, mean, std [B])``;
        rows with zero std get log_prob 0.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; use one of {sorted(SDE_TYPES)}.")
    dtype = torch.promote_types(torch.promote_types(x.dtype, velocity.dtype), torch.float32)
    x, velocity = x.to(dtype), velocity.to(dtype)
    mean, std = SDE_TYPES[sde_type](x, velocity, sigma, sigma_next, g, noise_scale)  # [B, ...], [B]
    return gaussian_transition(mean, std, x_next=x_next, noise=noise, generator=generator, reduce=reduce)


def euler_maruyama_moments(x: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar, g: Scalar,
                           noise_scale: Scalar = 1.0) -> tuple[Tensor, Tensor]:
    """Mean ``[B, ...]`` and std ``[B]`` of the Euler-Maruyama reverse-SDE step (``sde_step`` with ``"sde"``)."""
    s, s_next, g_b = _bcast(sigma, x), _bcast(sigma_next, x), _bcast(g, x)  # [B, 1, ...]
    score = -(x - (1 - s) * x0_from_velocity(x, velocity, sigma)) / s**2  # [B, ...]
    mean = x + (s_next - s) * (velocity - 0.5 * g_b**2 * score)  # [B, ...]
    std = _per_sample(noise_scale, x) * _per_sample(g, x) * torch.sqrt(
        _per_sample(sigma, x) - _per_sample(sigma_next, x)
    )  # [B]
    return mean, std


def cps_moments(x: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar, g: Scalar,
                noise_scale: Scalar = 1.0) -> tuple[Tensor, Tensor]:
    """Mean ``[B, ...]`` and std ``[B]`` of the coefficient-preserving step (CPS, Wang & Yu 2025; Flow-GRPO
    ``sde_type="cps"``).

    ``std = noise_scale * g * sigma_next`` and ``mean = (1 - sigma_next) * x0_pred + sqrt(sigma_next^2 - std^2) *
    eps_pred`` with ``x0_pred = x - sigma * v``, ``eps_pred = x + (1 - sigma) * v``: the sample's data coefficient is
    the flow's ``1 - sigma_next`` and its noise coefficient ``sqrt(sigma_next^2 - std^2 + std^2) = sigma_next``, for
    any ``g`` in [0, 1]. A split child (``noise_scale > 1``) is the CPS step with the larger fraction
    ``noise_scale * g`` (the mean uses the std the child is drawn with), so it keeps the coefficients too; a fraction
    above 1 leaves no old noise (the mean's coefficient is clamped at 0; the config refuses it).
    """
    s_next = _bcast(sigma_next, x)  # [B, 1, ...]
    std = _per_sample(noise_scale, x) * _per_sample(g, x) * _per_sample(sigma_next, x)  # [B]
    x0_pred = x0_from_velocity(x, velocity, sigma)  # [B, ...]
    eps_pred = x0_pred + velocity  # [B, ...] = x + (1 - sigma) * v
    keep = (s_next**2 - _bcast(std, x) ** 2).clamp(min=0).sqrt()  # [B, 1, ...] coefficient of the old noise
    return (1 - s_next) * x0_pred + keep * eps_pred, std


# sde_type -> (x, velocity, sigma, sigma_next, g, noise_scale) -> (mean [B, ...], std [B]) of the step.
SDE_TYPES: dict[str, Callable[[Tensor, Tensor, Scalar, Scalar, Scalar, Scalar], tuple[Tensor, Tensor]]] = {
    "sde": euler_maruyama_moments,  # DanceGRPO, Flow-GRPO, MixGRPO, BranchGRPO
    "cps": cps_moments,  # Flow-GRPO sde_type="cps"
}


def gaussian_transition(mean: Tensor, std: Tensor, *, x_next: Tensor | None = None, noise: Tensor | None = None,
                        generator: torch.Generator | None = None, reduce: str = "mean") -> StepOutput:
    """Draw ``x_next = mean + std * z`` (or take the stored ``x_next``) and score it under ``N(mean, std^2)``.

    Shared by every step family (rectified-flow SDE, DDIM with eta), so sampling and re-scoring agree.

    Args:
        mean: Transition mean ``[B, ...]`` (float32 or wider).
        std: Transition std ``[B]`` (0 for deterministic rows).
        x_next: A stored sample ``[B, ...]`` to re-score instead of sampling.
        noise: Standard normal noise ``[B, ...]`` to use instead of drawing it.
        generator: Generator for drawing the noise.
        reduce: ``"mean"`` or ``"sum"`` over non-batch dims for the log-prob.

    Returns:
        ``StepOutput(x_next, log_prob [B] or None when std == 0 everywhere, mean, std)``.
    """
    dtype = mean.dtype
    std_b = std.view(-1, *([1] * (mean.ndim - 1)))  # [B, 1, ...]
    if x_next is None:
        if noise is None:  # drawn on the generator's device (the CPU) and moved, as diffusers' randn_tensor,
            where = generator.device if generator is not None else mean.device  # so a seed gives the same samples anywhere
            noise = torch.randn(mean.shape, generator=generator, device=where, dtype=dtype).to(mean.device)  # [B, ...]
        x_next = mean + std_b * noise.to(dtype)  # [B, ...]
    else:
        x_next = x_next.to(dtype)
    log_prob = _transition_log_prob(x_next, mean, std, reduce)  # [B] or None
    return StepOutput(x_next=x_next, log_prob=log_prob, mean=mean, std=std)


def _transition_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, reduce: str) -> Tensor | None:
    """``gaussian_log_prob`` ``[B]``; rows with zero std get 0, and None when every row has zero std."""
    stochastic = std > 0  # [B]
    if not bool(stochastic.any()):
        return None
    safe_std = torch.where(stochastic, std, torch.ones_like(std))  # [B] keeps zero-std rows finite
    log_prob = gaussian_log_prob(x_next, mean, safe_std, reduce=reduce)  # [B]
    return torch.where(stochastic, log_prob, torch.zeros_like(log_prob))  # [B]
