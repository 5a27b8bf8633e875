"""Named records shared by the math and orchestration layers (shapes per field)."""

from typing import NamedTuple

from torch import Tensor


class StepOutput(NamedTuple):
    """One sampler transition from sigma to sigma_next."""

    x_next: Tensor  # [B, ...] the sample at sigma_next (drawn, or the one passed in to be re-scored)
    log_prob: Tensor | None  # [B] log-density of x_next under N(mean, std^2); None for deterministic steps
    mean: Tensor  # [B, ...] transition mean
    std: Tensor  # [B] transition std (0 for deterministic steps)
