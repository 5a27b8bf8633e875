"""Sampler math (layer 1): Gaussian log-density; rectified-flow Euler/SDE steps and DPM-Solver++(2M); the diffusion
(DDIM with eta) family; step families; sigma schedules. Pure torch: may import torch and the root modules only."""

from flowgrove.samplers.diffusion import ddim_dpm_step, ddim_ode_step, ddim_step, predict_x0_eps
from flowgrove.samplers.dpm_solver import dpmpp_2m_step, sample_dpmpp_2m, sample_euler
from flowgrove.samplers.family import FLOW_STEPS, DiffusionSchedule, StepFamily, diffusion_steps, sample_ode, step_family
from flowgrove.samplers.gaussian import gaussian_log_prob
from flowgrove.samplers.steps import (
    NOISE_LEVELS,
    constant_g,
    cps_g,
    euler_step,
    flow_grpo_g,
    noise_g,
    sde_step,
    sde_type_of,
    x0_from_velocity,
)

__all__ = [
    "FLOW_STEPS",
    "NOISE_LEVELS",
    "DiffusionSchedule",
    "StepFamily",
    "ddim_dpm_step",
    "ddim_ode_step",
    "ddim_step",
    "diffusion_steps",
    "predict_x0_eps",
    "sample_ode",
    "step_family",
    "constant_g",
    "cps_g",
    "dpmpp_2m_step",
    "euler_step",
    "flow_grpo_g",
    "gaussian_log_prob",
    "noise_g",
    "sample_dpmpp_2m",
    "sample_euler",
    "sde_step",
    "sde_type_of",
    "x0_from_velocity",
]
