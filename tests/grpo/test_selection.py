"""Trained-step selection masks."""

from __future__ import annotations

import pytest
import torch

from flowgrove.grpo.selection import accumulation_groups, first_k_mask, live_order, random_fraction_mask


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_fraction_dancegrpo_counts() -> None:
    # FLUX T = 16, last step excluded: int(15 * 0.6) = 9 of the first 15 steps per sample
    mask = random_fraction_mask(64, 16, 0.6, exclude_last=True, generator=_generator())
    assert mask.shape == (64, 16) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == 9).all()
    assert not mask[:, 15].any()
    assert len({tuple(row.tolist()) for row in mask}) > 1  # independent permutation per sample
    # without exclusion: int(16 * 0.6) = 9 of all 16, and the last step is sometimes picked
    mask = random_fraction_mask(64, 16, 0.6, exclude_last=False, generator=_generator())
    assert (mask.sum(dim=1) == 9).all() and mask[:, 15].any()


def test_random_fraction_seeded_and_at_least_one() -> None:
    a = random_fraction_mask(8, 10, 0.5, exclude_last=True, generator=_generator(3))
    b = random_fraction_mask(8, 10, 0.5, exclude_last=True, generator=_generator(3))
    assert torch.equal(a, b)  # identical seeds on every rank -> identical masks
    # int(9 * 0.05) = 0 -> at least 1
    assert (random_fraction_mask(4, 10, 0.05, exclude_last=True, generator=_generator()).sum(dim=1) == 1).all()
    with pytest.raises(ValueError, match="fraction"):
        random_fraction_mask(4, 10, 1.5, exclude_last=True, generator=_generator())
    with pytest.raises(ValueError, match="exclude_last"):
        random_fraction_mask(4, 1, 0.5, exclude_last=True, generator=_generator())


def test_first_k_mask() -> None:
    # Flow-GRPO: int(10 * 0.99) = 9 first steps of 10
    mask = first_k_mask(3, 10, 9)
    expected = torch.tensor([True] * 9 + [False]).expand(3, 10)
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="k must be"):
        first_k_mask(3, 10, 11)
    with pytest.raises(ValueError, match="num_samples"):
        first_k_mask(0, 10, 1)


def test_live_order_shuffles_the_live_rows_first_and_pads_with_dead_ones() -> None:
    live = torch.tensor([False, True, True, False, True, False])
    order = live_order(live, 5, _generator())
    assert sorted(order[:3].tolist()) == [1, 2, 4] and order[3:].tolist() == [0, 3]  # 3 live, then 2 dead as padding
    assert torch.equal(live_order(torch.ones(7, dtype=torch.bool), 7, _generator(3)), torch.randperm(7, generator=_generator(3)))
    assert live_order(torch.zeros(3, dtype=torch.bool), 0, _generator()).numel() == 0
    with pytest.raises(ValueError, match="between the 3 live rows and all 6 rows"):
        live_order(live, 2, _generator())


def test_accumulation_groups_count_the_global_batch() -> None:
    order = torch.arange(12)
    # samples: ceil(8 samples * 2 ranks / 4) = 4 groups of 3 rows; transitions: 5 // 2 = 2 rows per group on this rank
    assert [g.tolist() for g in accumulation_groups(order, "samples", 4, 8, 2)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [g.numel() for g in accumulation_groups(order, "transitions", 5, 8, 2)] == [2] * 6
    assert len(accumulation_groups(order[:2], "samples", 1, 8, 1)) == 2  # never more groups than rows
