"""Judges of the embedded ``numbers`` task: the shipped digit classifier on each half of a two-digit image.

``digit_pair`` is the mean of the classifier's probability of the prompted tens digit on the left 8x8 half and of
the prompted units digit on the right half (softmax over its 11 classes, "not a digit" included). It is a judge the
numbers task evaluates but does not train on (the task trains the ``ocr`` reward): a policy that games the OCR model
without drawing the digits shows up as an OCR reward rising while ``digit_pair`` falls. Images ``[B, 3, 8, 16]`` in
[0, 1], ink bright; scores ``[B]`` float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from flowgrove.rewards.base import check_reward_inputs, register_reward
from flowgrove.rewards.digits import DigitClassifier, classifier_on, classifier_pixels, digit_probability
from flowgrove.tasks.numbers import digits_of, number_of_prompt


def halves(images: Tensor) -> Tensor:
    """The left and right 8x8 halves of images ``[B, 3, 8, 16]``, stacked as ``[2B, 3, 8, 8]`` (all lefts first)."""
    if images.shape[-2:] != (8, 16):
        raise ValueError(f"digit_pair reads 8x16 two-digit images, got {tuple(images.shape[-2:])}; use it on task=numbers.")
    return torch.cat([images[..., :8], images[..., 8:]])  # [2B, 3, 8, 8]


def prompt_numbers(prompts: Sequence[str]) -> list[int]:
    """The number each prompt asks for; any other prompt is an error naming the reward."""
    try:
        return [number_of_prompt(p) for p in prompts]
    except ValueError as error:
        raise ValueError(f"reward digit_pair: {error} Use the numbers task's prompts or another reward.") from None


class DigitPairReward:
    """Mean of ``p(tens | left half)`` and ``p(units | right half)`` under the digit classifier."""

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts)
        tens, units = digits_of(torch.tensor(prompt_numbers(prompts), device=images.device))  # [B], [B]
        probs = digit_probability(self.classifier, halves(images), torch.cat([tens, units]))  # [2B]: lefts, then rights
        return probs.view(2, -1).mean(dim=0)  # [B]

    def embed(self, images: Tensor) -> Tensor:
        """Image embedding ``[B, 2 * hidden]``: the classifier's hidden layer on the left and right halves."""
        param = next(self.classifier.parameters())
        hidden = self.classifier.net[:3](classifier_pixels(halves(images.to(param.device))).to(param.dtype))  # [2B, h]
        left, right = hidden.chunk(2)
        return torch.cat([left, right], dim=1)  # [B, 2h]


@register_reward("digit_pair")
def digit_pair(weights: str | Path | None = None, device: str | torch.device | None = None) -> DigitPairReward:
    """Numbers task judge: the digit classifier's probability of the prompted digit on each half, averaged."""
    return DigitPairReward(classifier_on(weights, device))
