"""Diversity of samples in a feature space: mean pairwise distance within a prompt's group and the unbiased
squared MMD between two sample sets (RBF kernel, bandwidth by the median heuristic; BranchGRPO's estimator).

Pure torch, no I/O (math layer). Features are rows ``[N, D]``: a judge's image embedding, or flattened pixels.
Distances are computed in float64 from ``|x|^2 + |y|^2 - 2 x.y`` (memory ``N * M``, not ``N * M * D``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances ``[N, M]`` between rows of ``x`` [N, D] and ``y`` [M, D] (float64, >= 0)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T  # [N, M]
    return d2.clamp_min(0)


def _off_diagonal(m: Tensor) -> Tensor:
    """Entries ``i != j`` of a square matrix [N, N], as a flat tensor [N * (N - 1)]."""
    n = m.shape[0]
    return m[~torch.eye(n, dtype=torch.bool, device=m.device)]


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """Mean Euclidean distance over the distinct pairs of rows of ``features`` [N, D] (N >= 2); a scalar."""
    if features.shape[0] < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples, got {features.shape[0]}")
    return _off_diagonal(squared_distances(features, features)).sqrt().mean()


def group_diversity(features: Tensor, group_size: int) -> Tensor:
    """Within-prompt diversity: rows ``[G * group_size, D]`` in consecutive groups (one per prompt) -> the mean over
    groups of each group's :func:`mean_pairwise_distance`; a scalar."""
    if group_size < 2 or features.shape[0] % group_size:
        raise ValueError(f"group_diversity needs groups of >= 2 rows dividing {features.shape[0]}, got {group_size}")
    groups = features.flatten(1).reshape(-1, group_size, features.flatten(1).shape[1])  # [G, n, D]
    return torch.stack([mean_pairwise_distance(g) for g in groups]).mean()


def median_bandwidth(x: Tensor, y: Tensor) -> Tensor:
    """Median heuristic: the median distance over the distinct pairs of the pooled rows of ``x`` and ``y``.
    Falls back to 1 when it is 0 (all rows equal)."""
    z = torch.cat([x.flatten(1), y.flatten(1)])  # [N + M, D]
    median = _off_diagonal(squared_distances(z, z)).sqrt().median()
    return torch.where(median > 0, median, torch.ones_like(median))


def rbf_kernel(d2: Tensor, bandwidth: Tensor | float) -> Tensor:
    """``exp(-d^2 / (2 h^2))`` of squared distances ``d2`` with bandwidth ``h``."""
    return torch.exp(-d2 / (2 * torch.as_tensor(bandwidth, dtype=d2.dtype) ** 2))


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidth: Tensor | float | None = None) -> Tensor:
    """Unbiased squared MMD (Gretton et al. 2012, eq. 3) between rows of ``x`` [N, D] and ``y`` [M, D], N, M >= 2:

    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``, RBF kernel with
    ``bandwidth`` (default: :func:`median_bandwidth` of the pooled rows). May be slightly negative. A float64 scalar.
    """
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"mmd2_unbiased needs at least 2 rows per set, got {x.shape[0]} and {y.shape[0]}")
    h = median_bandwidth(x, y) if bandwidth is None else bandwidth
    kxx = _off_diagonal(rbf_kernel(squared_distances(x, x), h)).mean()
    kyy = _off_diagonal(rbf_kernel(squared_distances(y, y), h)).mean()
    kxy = rbf_kernel(squared_distances(x, y), h).mean()
    return kxx + kyy - 2 * kxy
