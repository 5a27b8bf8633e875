"""Sigma schedules for rectified-flow sampling (sigma 1 = noise, 0 = data).

Every schedule returns ``T + 1`` decreasing sigmas ``[sigma_0, ..., sigma_T]`` with ``sigma_T = 0``;
step ``i`` goes from ``sigma_i`` to ``sigma_{i+1}``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_steps(num_steps: int, shift: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}; pass the number of denoising steps T.")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}; use 1.0 for no shift (FLUX/SD3 use 3.0).")


def time_shift(t: Tensor, shift: float) -> Tensor:
    """Resolution time shift ``s*t / (1 + (s-1)*t)`` (SD3, Esser et al. 2024; ``sd3_time_shift`` in DanceGRPO).

    Args:
        t: Unshifted times in [0, 1], any shape.
        shift: Shift ``s > 0``; 1 is the identity, ``s > 1`` spends more steps near the noise end.

    Returns:
        Shifted times, same shape and dtype as ``t``.
    """
    return shift * t / (1 + (shift - 1) * t)


def flux_sigmas(num_steps: int, shift: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``time_shift(linspace(1, 0, T+1))`` (DanceGRPO / MixGRPO / BranchGRPO ``sample_reference_model``).

    Args:
        num_steps: Number of denoising steps ``T``.
        shift: Time shift ``s`` (3 for FLUX).
        dtype: Output dtype (computed in float64 first).

    Returns:
        Sigmas ``[T + 1]`` from exactly 1 to exactly 0.
    """
    _check_steps(num_steps, shift)
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # [T+1]
    return time_shift(t, shift).to(dtype)  # [T+1]


def sd3_sigmas(
    num_steps: int, shift: float, num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float32
) -> Tensor:
    """diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps`` schedule with static shift (Flow-GRPO, SD3.5).

    ``sigma_min = time_shift(1 / num_train_timesteps)`` is the last *training* sigma, already shifted;
    the inference grid ``linspace(1, sigma_min, T)`` is shifted a second time (spec bug F3, kept for
    parity) and a terminal 0 is appended.

    Args:
        num_steps: Number of denoising steps ``T``.
        shift: Static shift ``s`` (3 for SD3.5-Medium).
        num_train_timesteps: Training timesteps of the scheduler config.
        dtype: Output dtype (computed in float64 first).

    Returns:
        Sigmas ``[T + 1]``: ``1.0, ..., ~0.0089 (T=10, s=3), 0.0``.
    """
    _check_steps(num_steps, shift)
    sigma_min = time_shift(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
    raw = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64)  # [T]
    sigmas = torch.cat([time_shift(raw, shift), raw.new_zeros(1)])  # [T+1]
    return sigmas.to(dtype)


def _shifted_tail(sigmas: Tensor, start: int, n_post: int, shift: float) -> Tensor:
    """MixGRPO's tail: ``time_shift(linspace(t[start], 0, n_post))`` (its last model call is at a mid noise level)."""
    t_start = torch.linspace(1.0, 0.0, sigmas.numel(), dtype=torch.float64)[start]
    return time_shift(torch.linspace(float(t_start), 0.0, n_post, dtype=torch.float64), shift)  # [n_post]


def _logsnr_tail(sigmas: Tensor, start: int, n_post: int, shift: float) -> Tensor:
    """``n_post - 1`` points uniform in log-SNR ``log((1 - sigma) / sigma)`` from ``sigmas[start]`` to the grid's last
    nonzero sigma, then 0: the last model call is at the fine end of the grid, as DPM-Solver++ spaces its steps."""
    lo, hi = sigmas[start], sigmas[-2]  # first tail point, last nonzero point of the uncompressed grid
    if n_post == 2:  # the tail starts at the grid's last nonzero point (compressed_tail_sigmas gives longer ones more)
        return torch.stack([lo, sigmas.new_zeros(())])
    lam = torch.linspace(float(_logsnr(lo)), float(_logsnr(hi)), n_post - 1, dtype=torch.float64)
    return torch.cat([torch.sigmoid(-lam), sigmas.new_zeros(1)])  # [n_post], sigma = 1 / (1 + e^lambda)


# The widest log-SNR step a log-SNR tail takes before its last point: measured on digits over 300 steps, tails whose
# steps spanned 1.47 and 2.42 collapsed and 1.21 held (docs/collapse.md); a tail gets the points it needs to stay below.
MAX_LOGSNR_STEP = 1.25


def _logsnr(sigma: Tensor) -> Tensor:
    return torch.log((1 - sigma) / sigma)


def _logsnr_points(lo: Tensor, hi: Tensor) -> int:
    """Tail points (the last one 0) a log-SNR tail from ``lo`` to ``hi`` needs for steps of at most MAX_LOGSNR_STEP."""
    if hi >= lo:
        return 2
    return math.ceil(float(_logsnr(hi) - _logsnr(lo)) / MAX_LOGSNR_STEP - 1e-9) + 2


# window.tail_spacing -> the points of a compressed tail (sigmas [T+1], first tail index, points, shift) -> [n_post]
TAIL_SPACINGS = {"shifted": _shifted_tail, "logsnr": _logsnr_tail}


def compressed_tail_sigmas(
    num_steps: int, shift: float, last_kept_step: int, ratio: float, dtype: torch.dtype = torch.float32,
    spacing: str = "shifted",
) -> Tensor:
    """Rollout grid with the ODE tail after the SDE window compressed (MixGRPO-Flash "post", spec 3.3).

    With ``t = linspace(1, 0, T+1)`` and ``L = last_kept_step``, returns ``concat(flux_sigmas[:L+1], tail)`` with
    ``n_post = max(int((T - L) * ratio), 2)`` tail points; the first equals ``sigma_{L+1}``, the last is 0, and the
    tail has ``n_post - 1`` steps. Fix of MixGRPO bug M6: ``n_post >= 2``, so the grid always ends at sigma 0. If
    ``L + 1 >= T`` there is nothing to compress and ``flux_sigmas`` is returned. ``spacing`` places the points:
    ``shifted`` is MixGRPO's ``time_shift(linspace(t[L+1], 0, n_post))``; ``logsnr`` spaces them uniformly in
    log-SNR down to the uncompressed grid's last nonzero sigma, with at least the points that keep every step
    within :data:`MAX_LOGSNR_STEP` (see :data:`TAIL_SPACINGS`).

    Args:
        num_steps: Number of steps ``T`` of the uncompressed grid.
        shift: Time shift ``s``.
        last_kept_step: Index ``L`` of the last uncompressed step (the last SDE step of the window).
        ratio: Compression ratio ``rho`` in (0, 1] (0.4 Flash, 0.2 Flash*).
        dtype: Output dtype.
        spacing: A key of :data:`TAIL_SPACINGS`.

    Returns:
        Sigmas ``[L + 1 + n_post]`` from 1 to exactly 0 (``L + n_post`` steps).
    """
    if not 0 <= last_kept_step < num_steps:
        raise ValueError(f"last_kept_step must be in [0, {num_steps - 1}], got {last_kept_step}.")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}; MixGRPO-Flash uses 0.4, Flash* 0.2.")
    if spacing not in TAIL_SPACINGS:
        raise ValueError(f"spacing must be one of {sorted(TAIL_SPACINGS)}, got {spacing!r}.")
    sigmas = flux_sigmas(num_steps, shift, dtype=torch.float64)  # [T+1]
    if last_kept_step + 1 >= num_steps:
        return sigmas.to(dtype)
    n_post = max(int((num_steps - last_kept_step) * ratio), 2)
    if spacing == "logsnr":  # enough points for steps of at most MAX_LOGSNR_STEP, never more than the uncompressed grid
        n_post = min(num_steps - last_kept_step, max(n_post, _logsnr_points(sigmas[last_kept_step + 1], sigmas[-2])))
    tail = TAIL_SPACINGS[spacing](sigmas, last_kept_step + 1, n_post, shift)  # [n_post]
    return torch.cat([sigmas[: last_kept_step + 1], tail]).to(dtype)  # [L+1+n_post]
