"""Rectified-flow sampler steps: Gaussian log-density, Euler/SDE steps and DPM-Solver++(2M)."""

from flowgrove.samplers.dpm_solver import dpmpp_2m_step, sample_dpmpp_2m, sample_euler
from flowgrove.samplers.gaussian import gaussian_log_prob
from flowgrove.samplers.steps import (
    NOISE_LEVELS,
    constant_g,
    euler_step,
    flow_grpo_g,
    noise_g,
    sde_step,
    x0_from_velocity,
)

__all__ = [
    "NOISE_LEVELS",
    "constant_g",
    "dpmpp_2m_step",
    "euler_step",
    "flow_grpo_g",
    "gaussian_log_prob",
    "noise_g",
    "sample_dpmpp_2m",
    "sample_euler",
    "sde_step",
    "x0_from_velocity",
]
