"""digit_pair, the numbers task's judge: the digit classifier on each half of a two-digit image."""

from __future__ import annotations

import pytest
import torch

from flowgrove.rewards import build_reward
from flowgrove.rewards.digits import DigitClassifierReward, load_digit_classifier
from flowgrove.rewards.numbers import halves
from flowgrove.tasks.digits import digit_prompts, load_digits_tensors, split_digits
from flowgrove.tasks.numbers import TEST_NUMBERS, number_prompt, sample_numbers


@pytest.fixture(scope="module")
def pairs():
    data = sample_numbers(split_digits(load_digits_tensors()).heldout, TEST_NUMBERS, 100, torch.Generator().manual_seed(0))
    return ((data.images + 1) / 2).expand(-1, 3, -1, -1), data.numbers  # [100, 3, 8, 16], [100]


def test_digit_pair_is_the_mean_of_the_two_halves(pairs):
    images, numbers = pairs
    reward = build_reward("digit_pair")
    prompts = [number_prompt(n) for n in numbers.tolist()]
    score = reward(images, prompts)
    single = DigitClassifierReward(load_digit_classifier())
    left = single(images[..., :8], [digit_prompts()[n // 10] for n in numbers.tolist()])
    right = single(images[..., 8:], [digit_prompts()[n % 10] for n in numbers.tolist()])
    torch.testing.assert_close(score, (left + right) / 2)
    assert score.shape == (100,) and score.mean() >= 0.9  # real held-out digits
    swapped = reward(images, [number_prompt((n % 10) * 10 + n // 10) for n in numbers.tolist()])
    assert swapped.mean() < 0.3  # the digits in the wrong places (11, 66 keep their score)
    assert reward.embed(images).shape == (100, 2 * load_digit_classifier().hidden)


def test_digit_pair_rejects_other_shapes_and_prompts(pairs):
    images, numbers = pairs
    reward = build_reward("digit_pair")
    with pytest.raises(ValueError, match="8x16"):
        reward(images[..., :8], ["the number 12"] * 100)
    with pytest.raises(ValueError, match="digit_pair"):
        reward(images[:1], ["a handwritten seven"])
    assert halves(images[:2]).shape == (4, 3, 8, 8)
