"""Boundaries of the advantage, tree and loss functions that mutation testing found unchecked."""

from __future__ import annotations

import pytest
import torch

from flowgrove.grpo import advantages, tree
from flowgrove.grpo.losses import transition_kl


def test_a_group_of_one_gets_zero_advantages():
    # One sample and ddof 1: no spread to normalise by, so 0, never NaN.
    rewards, groups = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0, 0, 1])
    assert advantages.group_zscore(rewards, groups, ddof=1)[2] == 0
    assert torch.equal(advantages.group_zscore(torch.tensor([3.0]), torch.tensor([0]), ddof=1), torch.zeros(1))
    assert torch.equal(advantages.group_mean_global_std(torch.tensor([3.0]), torch.tensor([0]), ddof=1), torch.zeros(1))


def test_eps_is_added_to_the_std():
    # rewards [0, 2]: mean 1, std (ddof 1) sqrt(2); with eps 1: (-1, 1) / (sqrt(2) + 1)
    want = torch.tensor([-1.0, 1.0]) / (2**0.5 + 1)
    got = advantages.group_zscore(torch.tensor([0.0, 2.0]), torch.tensor([7, 7]), ddof=1, eps=1.0)
    torch.testing.assert_close(got, want)


def test_clamp_accepts_bounds_below_one():
    assert torch.equal(advantages.clamp_advantages(torch.tensor([-2.0, 0.1, 2.0]), 0.5), torch.tensor([-0.5, 0.1, 0.5]))


def test_split_steps_may_use_every_step():
    assert tree.split_steps_evenly(4, 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"in \[0, 3\], got 4"):
        tree.parse_split_steps([4], 4)


def test_depth_one_can_be_pruned():
    forest = tree.build_forest(3, [0], 2)
    assert tree.depth_pruned_depths({1}, iteration=0) == frozenset({1})
    masks = tree.depth_prune_mask(forest, {1})
    assert [m.tolist() for m in masks] == [[False, False], [True, True], [True, True]]


def test_width_pruning_ties_rank_the_lower_index_lower():
    # Four equal leaves, keep 2: the worst is the lowest index (0), the best the highest (3).
    forest = tree.build_forest(2, [0, 1], 2)
    masks = tree.width_prune_mask(forest, torch.zeros(4), keep=2)
    assert [m.tolist() for m in masks] == [[True, True], [True, True, True, True]]
    forest = tree.build_forest(3, [0, 1], 2)  # step 2 comes after the last split: its edges are pruned by leaf
    assert tree.width_prune_mask(forest, torch.zeros(4), keep=2)[2].tolist() == [True, False, False, True]


def test_combining_masks_of_different_depths_is_an_error():
    forest = tree.build_forest(3, [0], 2)
    with pytest.raises(ValueError):
        tree.combine_masks(tree.depth_prune_mask(forest, ()), tree.depth_prune_mask(forest, ())[:2])
    with pytest.raises(ValueError, match="combine_masks needs at least one mask"):
        tree.combine_masks()


def test_mean_fusion_ignores_the_temperature():
    forest = tree.build_forest(1, [0], 2)
    levels = tree.fuse_rewards(torch.tensor([1.0, 3.0]), forest, "mean", temperature=0.0)
    assert levels[0].tolist() == [2.0]


def test_depthwise_advantages_name_the_expected_sizes():
    forest = tree.build_forest(2, [0], 2)  # nodes per depth 1, 2, 2
    rewards = (torch.zeros(1), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="needs 3 entries, got 2"):
        tree.depthwise_advantages(rewards[:2], forest)
    with pytest.raises(ValueError, match="ddof must be >= 0, got -1"):
        tree.depthwise_advantages(rewards, forest, ddof=-1)
    with pytest.raises(ValueError, match=r"node_rewards\[1\] must be \[2\]"):
        tree.depthwise_advantages((torch.zeros(1), torch.zeros(3), torch.zeros(2)), forest)


def test_transition_kl_rejects_unknown_reductions():
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum'"):
        transition_kl(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, reduce="max")
