"""Rewards of the embedded ``digits`` task: prompt faithfulness (a digit classifier) and ink preferences.

``digit_classifier`` is the softmax probability of the prompted digit under a small MLP trained on the
sklearn digits (shipped weights). ``boldness`` and ``contrast`` are preferences the pretrained policy does not
maximise, so GRPO has headroom when they are mixed in (e.g. ``digit_classifier`` 1.0 + ``boldness`` 0.5).
All take images ``[B, 3, H, W]`` in [0, 1] (ink bright) and return ``[B]`` float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from flowgrove.data import PRETRAIN_HINT, assets_dir, digit_of_prompt, load_weights, save_weights
from flowgrove.rewards.base import RewardFn, check_reward_inputs, register_reward

CLASSIFIER_FILE = "digits_classifier.safetensors"
FORMAT = "flowgrove-digits-classifier-v1"


class DigitClassifier(nn.Module):
    """Two-layer MLP on the 64 pixels of an 8x8 digit in [-1, 1] (ink +1); returns 10 logits."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))

    def forward(self, pixels: Tensor) -> Tensor:
        """Logits ``[B, 10]`` for pixels ``[B, 1, 8, 8]`` in [-1, 1]."""
        return self.net(pixels)  # [B, 10]


def gray(images: Tensor) -> Tensor:
    """Grayscale ``[B, H, W]`` as the channel mean of images ``[B, 3, H, W]`` in [0, 1]."""
    return images.mean(dim=1)  # [B, H, W]


def classifier_pixels(images: Tensor) -> Tensor:
    """Classifier input ``[B, 1, 8, 8]`` in [-1, 1] from images ``[B, 3, 8, 8]`` in [0, 1] (inverse of decode)."""
    if images.shape[-2:] != (8, 8):
        raise ValueError(f"the digit classifier reads 8x8 images, got {tuple(images.shape[-2:])}.")
    return gray(images).unsqueeze(1) * 2 - 1  # [B, 1, 8, 8]


def save_digit_classifier(path: str | Path, classifier: DigitClassifier) -> Path:
    """Write the classifier to a safetensors file whose metadata holds its width."""
    return save_weights(path, classifier.state_dict(), {"format": FORMAT, "hidden": classifier.hidden})


def load_digit_classifier(weights: str | Path | None = None) -> DigitClassifier:
    """Load a classifier written by ``save_digit_classifier`` (default: the shipped one), in eval mode, frozen."""
    path = Path(weights) if weights else assets_dir() / CLASSIFIER_FILE
    tensors, config = load_weights(path, "digit classifier")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a digit classifier file (format {config.get('format')!r}); {PRETRAIN_HINT}.")
    classifier = DigitClassifier(int(config["hidden"]))
    try:
        classifier.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the classifier architecture ({error}); {PRETRAIN_HINT}.") from error
    return classifier.eval().requires_grad_(False)


class DigitClassifierReward:
    """Probability of the prompted digit, ``softmax(classifier(image))[digit(prompt)]`` (digits task)."""

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts)
        param = next(self.classifier.parameters())
        if param.device != images.device:
            self.classifier.to(images.device)
        digits = torch.tensor([digit_of_prompt(p) for p in prompts], device=images.device)  # [B]
        logits = self.classifier(classifier_pixels(images).to(param.dtype))  # [B, 10]
        probs = logits.float().softmax(dim=-1)  # [B, 10]
        return probs.gather(1, digits[:, None]).squeeze(1)  # [B]


def ink_boldness(images: Tensor, low: float = 0.25, high: float = 0.75) -> Tensor:
    """Soft fraction of strongly inked pixels: mean of ``clamp((g - low) / (high - low), 0, 1)`` over pixels.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1], ink bright.
        low: Gray level counted as no ink.
        high: Gray level counted as full ink.

    Returns:
        ``[B]`` float32 in [0, 1]; 1 when every pixel is at least ``high``.
    """
    ink = ((gray(images) - low) / (high - low)).clamp(0, 1)  # [B, H, W]
    return ink.float().mean(dim=(1, 2))  # [B]


def ink_contrast(images: Tensor) -> Tensor:
    """Mean distance from mid-gray, ``mean |2 g - 1|``: 1 when every pixel is pure black or white.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].

    Returns:
        ``[B]`` float32 in [0, 1].
    """
    return (2 * gray(images) - 1).abs().float().mean(dim=(1, 2))  # [B]


def image_brightness(images: Tensor) -> Tensor:
    """Mean pixel value ``[B]`` float32 of images ``[B, 3, H, W]`` in [0, 1]."""
    return images.float().mean(dim=(1, 2, 3))  # [B]


def _prompt_free(fn: Callable[..., Tensor], **kwargs: float) -> RewardFn:
    """A reward that ignores the prompts: ``fn(images, **kwargs)`` after the input checks."""

    def reward(images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts)
        return fn(images, **kwargs)  # [B]

    reward.__name__ = fn.__name__
    return reward


@register_reward("digit_classifier")
def digit_classifier(weights: str | Path | None = None, device: str | torch.device | None = None) -> DigitClassifierReward:
    """Prompt faithfulness on the digits task; ``weights`` None loads the shipped classifier."""
    classifier = load_digit_classifier(weights)
    if device is not None:
        classifier.to(device)
    return DigitClassifierReward(classifier)


@register_reward("boldness")
def boldness(low: float = 0.25, high: float = 0.75, device: str | torch.device | None = None) -> RewardFn:
    """Stroke boldness ``ink_boldness`` (a preference the pretrained digits policy leaves headroom on).

    ``device`` is accepted like every reward factory's and unused: the score follows the images' device.
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"boldness needs 0 <= low < high <= 1, got low={low}, high={high}; defaults 0.25, 0.75.")
    return _prompt_free(ink_boldness, low=low, high=high)


@register_reward("contrast")
def contrast(device: str | torch.device | None = None) -> RewardFn:
    """Pixel contrast ``ink_contrast`` (``device`` unused, as for ``boldness``)."""
    return _prompt_free(ink_contrast)


@register_reward("brightness")
def brightness(device: str | torch.device | None = None) -> RewardFn:
    """Mean pixel value over all channels, ``[B]`` in [0, 1], a trivial reward for tests (``device`` unused)."""
    return _prompt_free(image_brightness)
