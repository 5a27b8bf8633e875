"""The Gaussian transition log-density, the only copy of this formula in flowgrove."""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "mean") -> Tensor:
    """Per-sample log N(x; mean, std^2), reduced over non-batch dims (DanceGRPO / Flow-GRPO transition log-prob).

    All four reference repos average (not sum) over latent dims, which is why their PPO clip ranges
    are ~1e-4; keep ``reduce="mean"`` with those clip ranges. Computed in float32 or wider.

    Args:
        x: Samples ``[B, ...]``.
        mean: Means, broadcastable to ``x``.
        std: Standard deviation, a scalar (float or 0-dim) or per-sample ``[B]``; must be > 0.
        reduce: ``"mean"`` or ``"sum"`` over all non-batch dims.

    Returns:
        Log-densities ``[B]``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 lose the tiny ratio differences
    x = x.to(dtype)
    std = torch.as_tensor(std, dtype=dtype, device=x.device)
    if std.ndim == 1:
        std = std.view(-1, *([1] * (x.ndim - 1)))  # [B, 1, ...]
    log_density = (
        -((x - mean.to(dtype)) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )  # [B, ...]
    if x.ndim == 1:
        return log_density  # [B], no non-batch dims to reduce
    dims = tuple(range(1, x.ndim))
    return log_density.mean(dim=dims) if reduce == "mean" else log_density.sum(dim=dims)  # [B]
