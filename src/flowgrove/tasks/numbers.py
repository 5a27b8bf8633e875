"""The embedded ``numbers`` task: two-digit numbers "00".."99" drawn as two real sklearn digits side by side.

Images are ``[N, 1, 8, 16]`` float32 in [-1, 1] (ink +1): the tens digit on the left 8 columns, the units digit on
the right 8, each a real 8x8 digit of ``flowgrove.tasks.digits`` (training images come from the digits' training
split, evaluation images from their held-out split). Prompts read ``"the number 47"``.

The 100 numbers are split once, by a fixed seed, into 80 training numbers and 20 test numbers (``TEST_NUMBERS``):
every digit appears exactly twice as a tens digit and twice as a units digit among the test numbers, so each test
number is a new composition of a tens and a units digit that training saw separately. Nothing is ever trained on
a test number's prompt (pretraining and GRPO use ``train_prompts()``); the held-out evaluation uses
``heldout_prompts()``, as Flow-GRPO's OCR test set holds texts that training never showed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flowgrove.tasks.digits import DigitsData

NUMBERS = tuple(range(100))
SPLIT_SEED = 0
TESTS_PER_DIGIT = 2  # test numbers per tens digit (and, by construction, per units digit)
PRETRAIN_HINT = "run `flowgrove pretrain numbers` to (re)create the shipped weights"
PROMPT_WORDS = ("the", "number")


class NumbersData(NamedTuple):
    """Number images with their numbers."""

    images: Tensor  # [N, 1, 8, 16] float32 in [-1, 1]
    numbers: Tensor  # [N] long, 0..99


class NumberSplit(NamedTuple):
    """The fixed split of the 100 numbers."""

    train: tuple[int, ...]  # 80 numbers, sorted
    test: tuple[int, ...]  # 20 numbers, sorted


def _units_permutations(seed: int, count: int) -> Tensor:
    """``count`` permutations of 0..9 ``[count, 10]`` from a seeded generator, redrawn until no column repeats a
    digit (so tens digit ``t`` gets ``count`` different units digits)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perms = torch.stack([torch.randperm(10, generator=generator) for _ in range(count)])  # [count, 10]
        if all(len(set(perms[:, t].tolist())) == count for t in range(10)):
            return perms


def split_numbers(seed: int = SPLIT_SEED, per_digit: int = TESTS_PER_DIGIT) -> NumberSplit:
    """The fixed train / test split: test numbers ``10 t + perms[k, t]`` for every tens digit ``t`` and ``k <
    per_digit`` (``_units_permutations``), so every digit is ``per_digit`` times a tens and a units digit of a test
    number; the other numbers train. The same seed always gives the same split."""
    if not 1 <= per_digit <= 9:
        raise ValueError(f"per_digit={per_digit} must be in 1..9 (test numbers per digit); default {TESTS_PER_DIGIT}.")
    perms = _units_permutations(seed, per_digit)  # [per_digit, 10]
    test = sorted(10 * t + int(perms[k, t]) for t in range(10) for k in range(per_digit))
    train = sorted(set(NUMBERS) - set(test))
    return NumberSplit(tuple(train), tuple(test))


TRAIN_NUMBERS, TEST_NUMBERS = split_numbers()


def number_text(number: int) -> str:
    """Two characters, ``7 -> "07"``."""
    if not 0 <= int(number) <= 99:
        raise ValueError(f"numbers are 0..99, got {number}.")
    return f"{int(number):02d}"


def number_prompt(number: int) -> str:
    """``47 -> "the number 47"``, ``5 -> "the number 05"``."""
    return f"{' '.join(PROMPT_WORDS)} {number_text(number)}"


def number_prompts() -> list[str]:
    """All 100 prompts, index = number (the policy's prompt table)."""
    return [number_prompt(n) for n in NUMBERS]


def train_prompts() -> list[str]:
    """The prompts of the 80 training numbers (GRPO's and pretraining's prompts)."""
    return [number_prompt(n) for n in TRAIN_NUMBERS]


def heldout_prompts() -> list[str]:
    """The prompts of the 20 test numbers (the held-out evaluation's prompts; never trained on)."""
    return [number_prompt(n) for n in TEST_NUMBERS]


def number_of_prompt(prompt: str) -> int:
    """The number a prompt asks for (``"the number 47"`` -> 47).

    Raises:
        ValueError: ``prompt`` is not ``"the number NN"`` with two digits.
    """
    words = str(prompt).lower().split()
    if len(words) != 3 or tuple(words[:2]) != PROMPT_WORDS or len(words[2]) != 2 or not words[2].isdigit():
        raise ValueError(f"unknown numbers prompt {prompt!r}; the numbers task asks 'the number NN' with NN in 00..99.")
    return int(words[2])


def digits_of(numbers: Tensor) -> tuple[Tensor, Tensor]:
    """``(tens [N], units [N])`` of numbers ``[N]``."""
    return numbers // 10, numbers % 10


def _pick(data: DigitsData, labels: Tensor, generator: torch.Generator) -> Tensor:
    """One random image of ``data`` per label in ``labels`` ``[N]`` -> ``[N, 1, 8, 8]``."""
    out = torch.empty(labels.shape[0], *data.images.shape[1:])  # [N, 1, 8, 8]
    for digit in range(10):
        rows = (labels == digit).nonzero().squeeze(1)  # [n_d]
        if rows.numel() == 0:
            continue
        pool = (data.labels == digit).nonzero().squeeze(1)  # [m_d]
        if pool.numel() == 0:
            raise ValueError(f"no image of digit {digit} to draw a number from; pass digits covering 0..9.")
        out[rows] = data.images[pool[torch.randint(pool.numel(), (rows.numel(),), generator=generator)]]
    return out


def number_images(data: DigitsData, numbers: Tensor, generator: torch.Generator) -> Tensor:
    """Images ``[N, 1, 8, 16]`` of ``numbers`` ``[N]``: a random digit image of ``data`` of the tens digit, then
    (right) one of the units digit, each drawn independently from ``generator``."""
    tens, units = digits_of(numbers)
    return torch.cat([_pick(data, tens, generator), _pick(data, units, generator)], dim=-1)  # [N, 1, 8, 16]


def sample_numbers(data: DigitsData, numbers: tuple[int, ...], count: int, generator: torch.Generator) -> NumbersData:
    """``count`` images of numbers drawn uniformly from ``numbers`` (with replacement), ``NumbersData``."""
    pool = torch.tensor(numbers, dtype=torch.long)  # [K]
    chosen = pool[torch.randint(pool.numel(), (count,), generator=generator)]  # [N]
    return NumbersData(number_images(data, chosen, generator), chosen)
