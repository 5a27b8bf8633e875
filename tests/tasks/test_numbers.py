"""The numbers task: the fixed split of the 100 numbers, its prompts and its two-digit images."""

from __future__ import annotations

import pytest
import torch

from flowgrove.tasks.digits import load_digits_tensors, split_digits
from flowgrove.tasks.numbers import (NUMBERS, TEST_NUMBERS, TRAIN_NUMBERS, digits_of, heldout_prompts, number_images,
                                     number_of_prompt, number_prompt, number_prompts, number_text, sample_numbers,
                                     split_numbers, train_prompts)


def test_the_split_is_fixed_disjoint_and_covers_every_digit_in_both_positions():
    assert split_numbers() == (TRAIN_NUMBERS, TEST_NUMBERS) == split_numbers(seed=0)
    assert len(TRAIN_NUMBERS) == 80 and len(TEST_NUMBERS) == 20
    assert set(TRAIN_NUMBERS).isdisjoint(TEST_NUMBERS) and set(TRAIN_NUMBERS) | set(TEST_NUMBERS) == set(NUMBERS)
    tens, units = digits_of(torch.tensor(TEST_NUMBERS))
    assert torch.bincount(tens, minlength=10).tolist() == [2] * 10  # every tens digit twice
    assert torch.bincount(units, minlength=10).tolist() == [2] * 10  # every units digit twice
    # so every test number is a new pair of digits that training saw in the same positions
    train_tens, train_units = digits_of(torch.tensor(TRAIN_NUMBERS))
    assert set(train_tens.tolist()) == set(train_units.tolist()) == set(range(10))
    assert split_numbers(seed=1) != split_numbers(seed=0)
    with pytest.raises(ValueError, match="per_digit"):
        split_numbers(per_digit=0)


def test_prompts_and_their_numbers():
    assert number_prompt(47) == "the number 47" and number_prompt(5) == "the number 05" and number_text(0) == "00"
    assert number_prompts()[47] == "the number 47" and len(number_prompts()) == 100
    assert [number_of_prompt(p) for p in train_prompts()] == list(TRAIN_NUMBERS)
    assert [number_of_prompt(p) for p in heldout_prompts()] == list(TEST_NUMBERS)
    assert set(train_prompts()).isdisjoint(heldout_prompts())
    assert number_of_prompt("The  Number 07") == 7
    for bad in ("the number 7", "the number 470", "a handwritten seven", "the number ab", "number 47"):
        with pytest.raises(ValueError, match="the number NN"):
            number_of_prompt(bad)
    with pytest.raises(ValueError, match="0..99"):
        number_text(100)


def test_images_are_two_real_digits_side_by_side():
    data = load_digits_tensors()
    numbers = torch.tensor([47, 5, 90])
    images = number_images(data, numbers, torch.Generator().manual_seed(0))  # [3, 1, 8, 16]
    assert images.shape == (3, 1, 8, 16) and images.dtype == torch.float32
    assert bool(((images >= -1) & (images <= 1)).all())
    library = {tuple(img.flatten().tolist()): int(label) for img, label in zip(data.images, data.labels)}
    for image, number in zip(images, numbers.tolist()):
        assert library[tuple(image[..., :8].flatten().tolist())] == number // 10  # left: a real tens digit
        assert library[tuple(image[..., 8:].flatten().tolist())] == number % 10  # right: a real units digit
    again = number_images(data, numbers, torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


def test_sampled_training_images_never_show_a_test_number():
    split = split_digits(load_digits_tensors())
    data = sample_numbers(split.train, TRAIN_NUMBERS, 4000, torch.Generator().manual_seed(0))
    assert data.images.shape == (4000, 1, 8, 16) and data.numbers.shape == (4000,)
    assert set(data.numbers.tolist()) == set(TRAIN_NUMBERS)  # all 80, nothing else
    train_rows = {tuple(img.flatten().tolist()) for img in split.train.images}
    halves = torch.cat([data.images[:50, ..., :8], data.images[:50, ..., 8:]])
    assert all(tuple(h.flatten().tolist()) in train_rows for h in halves)  # digits of the training split only
