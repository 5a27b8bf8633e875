"""Group-relative advantages, worked by hand."""

from __future__ import annotations

import pytest
import torch

from flowgrove.grpo.advantages import (
    aggregate_advantages,
    aggregate_rewards,
    clamp_advantages,
    group_mean_global_std,
    group_zscore,
)

REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0])
GROUPS = torch.tensor([0, 0, 1, 1])  # group size 2


def test_group_zscore_by_hand() -> None:
    # group {1, 2}: mean 1.5, deviations -0.5, +0.5, unbiased var (0.25 + 0.25) / (2 - 1) = 0.5, std 0.70711
    # -> -0.5 / 0.70711 = -0.70711; same for group {3, 4}
    expected = torch.tensor([-0.70711, 0.70711, -0.70711, 0.70711])
    torch.testing.assert_close(group_zscore(REWARDS, GROUPS), expected, rtol=0, atol=1e-5)
    # ddof 0: std 0.5 -> +-1
    torch.testing.assert_close(group_zscore(REWARDS, GROUPS, ddof=0), torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    # group ids need not be contiguous or sorted
    shuffled = group_zscore(REWARDS, torch.tensor([7, 3, 7, 3]))  # groups {1, 3} and {2, 4}
    torch.testing.assert_close(shuffled, torch.tensor([-0.70711, -0.70711, 0.70711, 0.70711]), rtol=0, atol=1e-5)


def test_group_zscore_degenerate_groups_give_zero() -> None:
    # constant group {5, 5}: 0 / (0 + 1e-8) = 0; a group of one sample: 0 (no NaN from ddof 1)
    out = group_zscore(torch.tensor([5.0, 5.0, 3.0]), torch.tensor([0, 0, 1]))
    assert torch.equal(out, torch.zeros(3))


def test_group_mean_global_std_by_hand() -> None:
    # group means 1.5, 1.5, 3.5, 3.5; all rewards: mean 2.5, population var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25,
    # std 1.11803; A = (r - group mean) / (1.11803 + 1e-4) = +-0.5 / 1.11813 = +-0.44717
    expected = torch.tensor([-0.44717, 0.44717, -0.44717, 0.44717])
    torch.testing.assert_close(group_mean_global_std(REWARDS, GROUPS), expected, rtol=0, atol=1e-5)


def test_aggregate_advantages_and_rewards_by_hand() -> None:
    rewards = torch.stack([REWARDS, torch.tensor([0.0, 0.0, 1.0, 3.0])])  # [K=2, B=4]
    weights = [1.0, 0.5]
    # reward 2, group {0, 0} -> 0, 0; group {1, 3}: mean 2, unbiased std sqrt(2) -> -+0.70711
    # weighted: [-0.70711, 0.70711, -0.70711 - 0.5 * 0.70711, 0.70711 + 0.5 * 0.70711]
    expected = torch.tensor([-0.70711, 0.70711, -1.06066, 1.06066])
    torch.testing.assert_close(aggregate_advantages(rewards, weights, GROUPS), expected, rtol=0, atol=1e-5)
    # raw weighted sum: [1 + 0, 2 + 0, 3 + 0.5, 4 + 1.5]
    torch.testing.assert_close(aggregate_rewards(rewards, torch.tensor(weights)), torch.tensor([1.0, 2.0, 3.5, 5.5]))
    # any normalizer with the (rewards, group_ids) signature
    out = aggregate_advantages(rewards, weights, GROUPS, normalize=group_mean_global_std)
    assert out.shape == (4,)
    with pytest.raises(ValueError, match="one weight per reward"):
        aggregate_rewards(rewards, [1.0])


def test_clamp_and_validation() -> None:
    torch.testing.assert_close(clamp_advantages(torch.tensor([-7.0, 0.5, 9.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))
    with pytest.raises(ValueError, match="max_abs"):
        clamp_advantages(torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="group_ids"):
        group_zscore(REWARDS, torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("size", [12, 24])
def test_a_tied_group_gets_exactly_zero(value, size) -> None:
    # sum / count of twelve float32 0.1s is not 0.1: the residue (~1e-8) over std ~1e-8 + eps 1e-8 gave +-0.6.
    tied = torch.full((size,), value)
    other = torch.linspace(0, 1, size)
    rewards, groups = torch.cat([tied, other]), torch.arange(2 * size) // size
    for advantages in (group_zscore(rewards, groups), group_mean_global_std(rewards, groups)):
        assert torch.equal(advantages[:size], torch.zeros(size))
        assert advantages[size:].abs().min() > 0  # the other group is normalised as before
    torch.testing.assert_close(group_zscore(other, torch.zeros(size, dtype=torch.long)),
                               (other - other.mean()) / (other.std() + 1e-8))
