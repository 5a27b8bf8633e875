"""Diversity metrics: the unbiased MMD^2 against a hand-worked case and a plain-Python reference, pairwise distances."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrove.evaluation.diversity import group_diversity, mean_pairwise_distance, median_bandwidth, mmd2_unbiased


def _reference_mmd2(x: list[list[float]], y: list[list[float]]) -> float:
    """Unbiased MMD^2, RBF kernel, median-heuristic bandwidth, in plain Python (no numpy, scipy or torch)."""
    def dist(a, b):
        return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))

    z = x + y
    d = sorted(dist(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if i != j)
    h = d[(len(d) - 1) // 2]  # lower median, as torch.median
    k = lambda a, b: math.exp(-dist(a, b) ** 2 / (2 * h * h))  # noqa: E731
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd2_hand_worked_case():
    # X = {0, 1}, Y = {0, 2}. Pooled distances over distinct pairs: 0, 1, 1, 1, 2, 2 (each twice) -> median h = 1.
    # k(d) = exp(-d^2 / 2): Kxx = e^-0.5, Kyy = e^-2, Kxy = (1 + e^-2 + 2 e^-0.5) / 4
    # MMD^2 = e^-0.5 + e^-2 - (1 + e^-2 + 2 e^-0.5) / 2 = e^-2 / 2 - 1/2 = -0.432332...
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    assert median_bandwidth(x, y).item() == 1.0
    assert mmd2_unbiased(x, y).item() == pytest.approx(math.exp(-2) / 2 - 0.5, abs=1e-12)


def test_mmd2_matches_plain_python_reference():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) + 0.7
    assert mmd2_unbiased(x, y).item() == pytest.approx(_reference_mmd2(x.tolist(), y.tolist()), abs=1e-9)


def test_mmd2_separates_shifted_sets_and_is_near_zero_for_one_distribution():
    g = torch.Generator().manual_seed(1)
    same = mmd2_unbiased(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)).item()
    apart = mmd2_unbiased(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 2).item()
    assert abs(same) < 0.01 and apart > 0.3


def test_mean_pairwise_distance_hand_worked():
    # corners of a unit square: 4 sides of length 1 and 2 diagonals of sqrt(2) -> (4 + 2 sqrt 2) / 6
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_distance(square).item() == pytest.approx((4 + 2 * math.sqrt(2)) / 6, abs=1e-12)


def test_group_diversity_averages_groups_and_is_zero_for_collapsed_groups():
    groups = torch.tensor([[0.0], [2.0], [5.0], [5.0]])  # group 1: distance 2; group 2: collapsed
    assert group_diversity(groups, 2).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="groups of >= 2 rows"):
        group_diversity(groups, 3)
