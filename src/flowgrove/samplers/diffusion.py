"""Diffusion-model (variance-preserving) steps: DDIM with eta and its log-prob, x0 / score, DPM-Solver++(2M).

Conventions (Ho et al. 2020; Song et al. 2021): ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` with
``abar = alphas_cumprod``. The network predicts ``eps`` (``"epsilon"``) or ``v = sqrt(abar) * eps -
sqrt(1 - abar) * x0`` (``"v_prediction"``, Salimans & Ho 2022). The functions below take ``abar`` of the
current and the next step directly (python floats, 0-dim or per-sample ``[B]`` tensors), so they work on any
schedule; :mod:`flowgrove.samplers.family` maps the rollout's step coordinate onto a schedule.

DDIM with eta (Song et al. 2021, eq. 12; diffusers ``DDIMScheduler.step``) is DanceGRPO's diffusion SDE step
(its SD recipe, eq. 7 with ``eps_t`` set by eta): eta = 0 is the probability-flow ODE step, eta = 1 ancestral.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowgrove.samplers.dpm_solver import dpmpp_2m_step
from flowgrove.samplers.steps import Scalar, _bcast, _per_sample, gaussian_transition
from flowgrove.samplers.types import StepOutput

PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012, dtype: torch.dtype = torch.float32) -> Tensor:
    """``cumprod(1 - beta)`` with ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2`` (Stable Diffusion).

    Computed in ``dtype`` as diffusers' schedulers do (float32), so the table equals theirs.

    Returns:
        ``alphas_cumprod`` ``[T]``, decreasing from ``1 - beta_start``.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2  # [T]
    return torch.cumprod(1.0 - betas, dim=0)  # [T]


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """The zero-terminal-SNR rescale of Lin et al. 2023 (Algorithm 1; diffusers ``rescale_zero_terminal_snr``).

    ``sqrt(abar)`` is shifted so its last value is 0 and scaled so its first value is unchanged.

    Args:
        alphas_cumprod: ``[T]`` any schedule.

    Returns:
        ``alphas_cumprod`` ``[T]`` with ``abar[-1] = 0`` (infinite noise at the last timestep).
    """
    root = alphas_cumprod.sqrt()  # [T]
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2  # [T]


def predict_x0_eps(x: Tensor, model_output: Tensor, alpha_bar: Scalar, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Data and noise predictions ``(x0_pred, eps_pred)`` from the network output (DDIM, eq. 9).

    epsilon: ``x0 = (x - sqrt(1 - abar) * eps) / sqrt(abar)``; v: ``x0 = sqrt(abar) x - sqrt(1 - abar) v``,
    ``eps = sqrt(abar) v + sqrt(1 - abar) x``.

    Args:
        x: Latents ``[B, ...]`` at ``alpha_bar``.
        model_output: The network's ``eps`` or ``v`` ``[B, ...]``.
        alpha_bar: ``abar_t``, scalar or ``[B]``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.

    Returns:
        ``(x0_pred, eps_pred)``, each ``[B, ...]``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    ab = _bcast(alpha_bar, x)  # [B, 1, ...]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction_type == "epsilon":
        return (x - s * model_output) / a, model_output
    return a * x - s * model_output, a * model_output + s * x


def add_noise_vp(x0: Tensor, noise: Tensor, alpha_bar: Scalar) -> Tensor:
    """The forward process ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise`` (DDPM; diffusers ``add_noise``) ``[B, ...]``."""
    ab = _bcast(alpha_bar, x0)  # [B, 1, ...]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # [B, ...]


def output_target(x0: Tensor, noise: Tensor, alpha_bar: Scalar, prediction_type: str) -> Tensor:
    """The network's pretraining target at ``x_t`` of :func:`add_noise_vp`: ``noise`` (``"epsilon"``) or
    ``v = sqrt(abar) noise - sqrt(1 - abar) x0`` (``"v_prediction"``; diffusers ``get_velocity``) ``[B, ...]``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    if prediction_type == "epsilon":
        return noise
    ab = _bcast(alpha_bar, x0)  # [B, 1, ...]
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0  # [B, ...]


def diffusion_score(eps_pred: Tensor, alpha_bar: Scalar) -> Tensor:
    """Score ``grad log p_t(x) = -eps / sqrt(1 - abar_t)`` of the noised marginal (Song et al. 2021).

    Args:
        eps_pred: Noise prediction ``[B, ...]``.
        alpha_bar: ``abar_t`` (< 1), scalar or ``[B]``.

    Returns:
        The score ``[B, ...]``.
    """
    return -eps_pred / (1 - _bcast(alpha_bar, eps_pred)).sqrt()  # [B, ...]


def ddim_std(alpha_bar: Scalar, alpha_bar_prev: Scalar, eta: Scalar, like: Tensor) -> Tensor:
    """DDIM's ``sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)`` ``[B]``.

    eta = 1 is the DDPM posterior std (ancestral sampling); ``like`` gives batch size, device and dtype.
    """
    ab, ab_prev, e = (_per_sample(v, like) for v in (alpha_bar, alpha_bar_prev, eta))  # [B]
    variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)  # [B]
    return e * variance.clamp(min=0).sqrt()  # [B]


def ddim_mean(x0_pred: Tensor, eps_pred: Tensor, alpha_bar_prev: Scalar, std: Tensor) -> Tensor:
    """DDIM's mean ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps`` ``[B, ...]`` (Song et al. 2021, eq. 12)."""
    ab_prev = _bcast(alpha_bar_prev, x0_pred)  # [B, 1, ...]
    std_b = std.view(-1, *([1] * (x0_pred.ndim - 1)))  # [B, 1, ...]
    return ab_prev.sqrt() * x0_pred + (1 - ab_prev - std_b**2).clamp(min=0).sqrt() * eps_pred


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    alpha_bar: Scalar,
    alpha_bar_prev: Scalar,
    eta: Scalar,
    prediction_type: str = "epsilon",
    *,
    sde_type: str = "sde",
    noise_scale: Scalar = 1.0,
    x_next: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> StepOutput:
    """DDIM step with eta and its transition log-prob (Song et al. 2021; DDPO / DanceGRPO ``ddim_step_with_logprob``).

    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + noise_scale * sigma_t * z`` with
    ``sigma_t`` of :func:`ddim_std`. The log-prob is taken under the std the sample was drawn with,
    ``noise_scale * sigma_t`` (as the flow SDE step). Computed in float32 or wider.
    ``sde_type="cps"`` (the flow family's coefficient-preserving step in diffusion variables) draws
    ``std = noise_scale * eta * sqrt(1 - abar_prev)``, a fraction ``eta`` of the next step's noise coefficient, and
    the mean above uses that std, so the sample keeps the marginal's coefficients (see :func:`ddim_cps_moments`).

    Args:
        x: Latents ``[B, ...]`` at ``alpha_bar``.
        model_output: The network's ``eps`` or ``v`` ``[B, ...]``.
        alpha_bar: ``abar_t``, scalar or ``[B]``.
        alpha_bar_prev: ``abar`` of the next (less noisy) step, scalar or ``[B]``.
        eta: DDIM eta (0: ODE, 1: ancestral), scalar or ``[B]``; the noise fraction ``g`` under ``"cps"``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        sde_type: ``"sde"`` (DDIM with eta) or ``"cps"``.
        noise_scale: Extra std multiplier (BranchGRPO split steps), scalar or ``[B]``.
        x_next: A stored sample ``[B, ...]`` to re-score instead of sampling.
        noise: Standard normal noise ``[B, ...]`` (diffusers' ``variance_noise``).
        generator: Generator for drawing the noise.
        reduce: ``"mean"`` or ``"sum"`` over non-batch dims for the log-prob.

    Returns:
        ``StepOutput(x_next, log_prob [B] or None when eta = 0, mean, std [B])``.
    """
    if sde_type not in DDIM_SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; use one of {sorted(DDIM_SDE_TYPES)}.")
    dtype = torch.promote_types(torch.promote_types(x.dtype, model_output.dtype), torch.float32)
    x, model_output = x.to(dtype), model_output.to(dtype)
    x0_pred, eps_pred = predict_x0_eps(x, model_output, alpha_bar, prediction_type)  # [B, ...] each
    mean, std = DDIM_SDE_TYPES[sde_type](x0_pred, eps_pred, alpha_bar, alpha_bar_prev, eta, noise_scale)
    return gaussian_transition(mean, std, x_next=x_next, noise=noise, generator=generator, reduce=reduce)


def ddim_moments(x0_pred: Tensor, eps_pred: Tensor, alpha_bar: Scalar, alpha_bar_prev: Scalar, eta: Scalar,
                 noise_scale: Scalar = 1.0) -> tuple[Tensor, Tensor]:
    """Mean ``[B, ...]`` and drawn std ``[B]`` of DDIM with eta: the mean under :func:`ddim_std`, the std times
    ``noise_scale``."""
    std = ddim_std(alpha_bar, alpha_bar_prev, eta, x0_pred)  # [B]
    return ddim_mean(x0_pred, eps_pred, alpha_bar_prev, std), _per_sample(noise_scale, x0_pred) * std


def ddim_cps_moments(x0_pred: Tensor, eps_pred: Tensor, alpha_bar: Scalar, alpha_bar_prev: Scalar, g: Scalar,
                     noise_scale: Scalar = 1.0) -> tuple[Tensor, Tensor]:
    """Mean ``[B, ...]`` and std ``[B]`` of the coefficient-preserving step in diffusion variables: ``std =
    noise_scale * g * sqrt(1 - abar_prev)`` and DDIM's mean under that std (``alpha_bar`` unused: the step needs only
    the next coefficients)."""
    ab_prev = _per_sample(alpha_bar_prev, x0_pred)  # [B]
    std = _per_sample(noise_scale, x0_pred) * _per_sample(g, x0_pred) * (1 - ab_prev).clamp(min=0).sqrt()  # [B]
    return ddim_mean(x0_pred, eps_pred, alpha_bar_prev, std), std


# sde_type -> (x0_pred, eps_pred, abar, abar_prev, g, noise_scale) -> (mean [B, ...], std [B]), as the flow SDE_TYPES.
DDIM_SDE_TYPES = {"sde": ddim_moments, "cps": ddim_cps_moments}


def ddim_ode_step(x: Tensor, model_output: Tensor, alpha_bar: Scalar, alpha_bar_prev: Scalar,
                  prediction_type: str = "epsilon") -> Tensor:
    """Deterministic DDIM step (eta = 0): ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps`` ``[B, ...]``."""
    x0_pred, eps_pred = predict_x0_eps(x, model_output, alpha_bar, prediction_type)  # [B, ...] each
    return ddim_mean(x0_pred, eps_pred, alpha_bar_prev, x.new_zeros(x.shape[0]))  # [B, ...]


def _flow_coordinates(alpha_bar: Scalar, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(sigma_f [B], c [B])``: the rectified-flow noise level ``s / (a + s)`` and scale ``c = a + s`` with
    ``x_t = c * x_flow`` (``a = sqrt(abar)``, ``s = sqrt(1 - abar)``); both share ``lambda = log(a / s)``."""
    ab = _per_sample(alpha_bar, like)  # [B]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return s / (a + s), a + s


def ddim_dpm_step(x: Tensor, x0_pred: Tensor, alpha_bar: Scalar, alpha_bar_next: Scalar,
                  prev_x0_pred: Tensor | None = None, prev_alpha_bar: Scalar | None = None, *,
                  monotone: bool = False) -> Tensor:
    """DPM-Solver++(2M) midpoint step in diffusion variables (Lu et al. 2022; diffusers ``DPMSolverMultistepScheduler``).

    ``x_t = (s_t / s_s) x + a_t (1 - e^{-h}) D0 [+ 1/2 a_t (1 - e^{-h}) D1]``, ``lambda = log(a / s)``. The
    rectified-flow latent ``x / (a + s)`` has the same data prediction and lambda, so this is the flow
    :func:`~flowgrove.samplers.dpm_solver.dpmpp_2m_step` (the one copy of the formula) between two rescalings;
    second order, first-order fallbacks and ``abar_next = 1`` (returns ``x0_pred``) behave as there.

    Args:
        x: Latents ``[B, ...]`` at ``alpha_bar``.
        x0_pred: Data prediction ``[B, ...]`` at ``(x, alpha_bar)``.
        alpha_bar: ``abar`` now, scalar or ``[B]``.
        alpha_bar_next: ``abar`` at the next step (> alpha_bar), scalar or ``[B]``.
        prev_x0_pred: Data prediction ``[B, ...]`` of the previous step, or None.
        prev_alpha_bar: ``abar`` of the previous step, or None.
        monotone: As in :func:`~flowgrove.samplers.dpm_solver.dpmpp_2m_step` (in the flow coordinates).

    Returns:
        Latents ``[B, ...]`` at ``alpha_bar_next``.
    """
    sigma, c = _flow_coordinates(alpha_bar, x)  # [B] each
    sigma_next, c_next = _flow_coordinates(alpha_bar_next, x)
    prev_sigma = None if prev_alpha_bar is None else _flow_coordinates(prev_alpha_bar, x)[0]
    y_next = dpmpp_2m_step(x / _bcast(c, x), x0_pred, sigma, sigma_next, prev_x0_pred, prev_sigma, monotone=monotone)  # [B, ...]
    return _bcast(c_next, x) * y_next  # [B, ...]
