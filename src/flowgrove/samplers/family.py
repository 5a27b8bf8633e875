"""Step families: the sampler steps of a model family behind one record, chosen by the policy.

Rollouts, trees, windows and Flash tails speak one step coordinate ``sigma`` in [0, 1] (1 = noise, 0 = data)
and one policy output (``policy.velocity``); a :class:`StepFamily` says what both mean:

- ``FLOW_STEPS`` (rectified flow): ``sigma`` is the flow noise level, the output the velocity ``noise - x0``.
- :func:`diffusion_steps` (DDPM / DDIM models): the output is ``eps`` or ``v``, and ``sigma`` is a continuous
  timestep fraction, ``tau = sigma * T - 1`` on the model's ``T`` training timesteps, with ``tau < 0`` (sigma 0)
  the scheduler's final ``alphas_cumprod``. The grid ``linspace(1, 0, N + 1)`` is exactly diffusers'
  ``timestep_spacing="trailing"`` DDIM grid; SDE steps are DDIM with ``eta = g`` (``sde_type="cps"``: DDIM's mean
  under the coefficient-preserving std ``g * sqrt(1 - abar_next)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowgrove.samplers.diffusion import (PREDICTION_TYPES, add_noise_vp, ddim_dpm_step, ddim_ode_step, ddim_step,
                                          output_target, predict_x0_eps)
from flowgrove.samplers.dpm_solver import dpmpp_2m_step
from flowgrove.samplers.steps import Scalar, add_noise, euler_step, sde_step, velocity_target, x0_from_velocity
from flowgrove.samplers.types import StepOutput

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], sigma 0-dim) -> model output [B, ...]
TIMESTEP_SNAP = 1e-3  # positions this close to an integer timestep are that timestep (float32 grids)


class StepFamily(NamedTuple):
    """The four step functions of a family, all in the rollout's ``sigma`` and the policy's output ``out``, and its
    forward process: the noised sample and the output that pretraining regresses there (forward-process objectives)."""

    name: str
    x0: Callable[[Tensor, Tensor, Scalar], Tensor]  # (x, out, sigma) -> x0_pred [B, ...]
    sde: Callable[..., StepOutput]  # (x, out, sigma, sigma_next, g, *, sde_type, noise_scale, x_next, noise, generator, reduce)
    ode: Callable[[Tensor, Tensor, Scalar, Scalar], Tensor]  # (x, out, sigma, sigma_next) -> x_next [B, ...]
    dpm: Callable[..., Tensor]  # (x, x0_pred, sigma, sigma_next, prev_x0_pred, prev_sigma, *, monotone) -> x_next
    add_noise: Callable[[Tensor, Tensor, Scalar], Tensor]  # (x0, noise, sigma) -> x at sigma [B, ...]
    target: Callable[[Tensor, Tensor, Scalar], Tensor]  # (x0, noise, sigma) -> the output pretraining regresses [B, ...]


FLOW_STEPS = StepFamily("flow", x0_from_velocity, sde_step, euler_step, dpmpp_2m_step, add_noise, velocity_target)


def timestep_position(sigma: Scalar, num_train_timesteps: int) -> Tensor:
    """``sigma * T`` in float64, snapped to the nearest integer within ``TIMESTEP_SNAP``; the model timestep is this
    minus 1 (so ``sigma = 1`` is timestep ``T - 1``)."""
    pos = torch.as_tensor(sigma, dtype=torch.float64) * num_train_timesteps
    near = pos.round()
    return torch.where((pos - near).abs() < TIMESTEP_SNAP, near, pos)


@dataclass(frozen=True)
class DiffusionSchedule:
    """A diffusion model's noise schedule and parametrisation (from its scheduler config)."""

    alphas_cumprod: Tensor  # [T] abar at timesteps 0..T-1
    final_alpha_cumprod: float  # abar after the last step (1.0, or abar[0] with set_alpha_to_one=False)
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def timestep(self, sigma: Scalar) -> Tensor:
        """The model-facing timestep ``tau = sigma * T - 1`` (float64, integers on the trailing grid)."""
        return timestep_position(sigma, self.num_train_timesteps) - 1

    def alpha_bar(self, sigma: Scalar) -> Tensor:
        """``abar(tau)``, linear between integer timesteps, the final value at ``tau <= -1`` (float64)."""
        table = torch.cat([self.alphas_cumprod.new_tensor([self.final_alpha_cumprod]), self.alphas_cumprod])
        pos = timestep_position(sigma, self.num_train_timesteps).clamp(0, self.num_train_timesteps)
        table = table.to(pos.device, torch.float64)  # [T + 1] at positions tau + 1 = 0..T
        low = pos.floor().clamp(max=self.num_train_timesteps - 1)
        weight = pos - low
        low = low.long()
        return table[low] * (1 - weight) + table[low + 1] * weight


def diffusion_steps(schedule: DiffusionSchedule) -> StepFamily:
    """The DDIM family on ``schedule``: SDE = DDIM with ``eta = g`` (or CPS), ODE = DDIM eta 0, DPM-Solver++(2M) tails;
    the forward process ``sqrt(abar) x0 + sqrt(1 - abar) noise`` with its ``eps`` or ``v`` target."""
    ab, kind = schedule.alpha_bar, schedule.prediction_type

    def x0(x: Tensor, out: Tensor, sigma: Scalar) -> Tensor:
        return predict_x0_eps(x, out, ab(sigma), kind)[0]

    def sde(x: Tensor, out: Tensor, sigma: Scalar, sigma_next: Scalar, g: Scalar, **kwargs) -> StepOutput:
        return ddim_step(x, out, ab(sigma), ab(sigma_next), g, kind, **kwargs)

    def ode(x: Tensor, out: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
        return ddim_ode_step(x, out, ab(sigma), ab(sigma_next), kind)

    def dpm(x: Tensor, x0_pred: Tensor, sigma: Scalar, sigma_next: Scalar, prev_x0_pred: Tensor | None = None,
            prev_sigma: Scalar | None = None, *, monotone: bool = False) -> Tensor:
        prev = None if prev_sigma is None else ab(prev_sigma)
        return ddim_dpm_step(x, x0_pred, ab(sigma), ab(sigma_next), prev_x0_pred, prev, monotone=monotone)

    def noised(x0: Tensor, noise: Tensor, sigma: Scalar) -> Tensor:
        return add_noise_vp(x0, noise, ab(sigma))

    def target(x0: Tensor, noise: Tensor, sigma: Scalar) -> Tensor:
        return output_target(x0, noise, ab(sigma), kind)

    return StepFamily(f"diffusion-{kind}", x0, sde, ode, dpm, noised, target)


def step_family(policy: object) -> StepFamily:
    """The policy's ``step_family`` attribute, or ``FLOW_STEPS`` for policies without one (every flow model)."""
    return getattr(policy, "step_family", FLOW_STEPS)


def sample_ode(family: StepFamily, model_fn: ModelFn, x: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic sampler of ``family`` over a grid ``[N + 1]`` (Euler for flows, DDIM eta 0 for diffusion).

    Args:
        family: The step family.
        model_fn: ``model_fn(x, sigma) -> out`` with ``x [B, ...]`` and a 0-dim ``sigma``.
        x: Starting latents ``[B, ...]`` at ``sigmas[0]``.
        sigmas: Decreasing grid ``[N + 1]``.

    Returns:
        Latents ``[B, ...]`` at ``sigmas[-1]``.
    """
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = family.ode(x, model_fn(x, sigma), sigma, sigma_next)  # [B, ...]
    return x
