"""Rewards of the embedded ``digits`` task: prompt faithfulness (a digit classifier) and ink preferences.

``digit_classifier`` is the softmax probability of the prompted digit under a small MLP trained on the
sklearn digits plus an eleventh "not a digit" class (inverted, filled, grey-background, noise, two-digit and
speckled images; ``flowgrove.tasks.digits.not_a_digit``), so frames filled with ink score near 0 instead of rewarding
the hack. ``boldness`` (bounded ink mass) and ``contrast`` are preferences the pretrained policy does not
maximise, so GRPO has headroom when they are mixed in (default ``digit_classifier`` 1.0 + ``boldness`` 1.0).
All take images ``[B, 3, H, W]`` in [0, 1] (ink bright) and return ``[B]`` float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from flowgrove.rewards.base import RewardFn, check_reward_inputs, register_reward
from flowgrove.tasks.digits import NOT_A_DIGIT, PRETRAIN_HINT, assets_dir, digit_of_prompt, digit_prompts, load_weights, save_weights

CLASSIFIER_FILE = "digits_classifier.safetensors"
FORMAT = "flowgrove-digits-classifier-v2"  # v2: eleven classes, index 10 = not a digit
NUM_CLASSES = NOT_A_DIGIT + 1
BOLD_TARGET = 0.4  # ink mass of a bold real digit, see ``ink_boldness``


class DigitClassifier(nn.Module):
    """Two-layer MLP on the 64 pixels of an 8x8 digit in [-1, 1] (ink +1); logits of digits 0-9 and not a digit."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, pixels: Tensor) -> Tensor:
        """Logits ``[B, 11]`` for pixels ``[B, 1, 8, 8]`` in [-1, 1]."""
        return self.net(pixels)  # [B, 11]


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
        raise ValueError(f"{path} is not a {FORMAT} file (format {config.get('format')!r}; v1 files lack the "
                         f"not-a-digit class); {PRETRAIN_HINT}.")
    classifier = DigitClassifier(int(config["hidden"]))
    try:
        classifier.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the classifier architecture ({error}); {PRETRAIN_HINT}.") from error
    return classifier.eval().requires_grad_(False)


def prompt_digits(prompts: Sequence[str], reward: str) -> list[int]:
    """The digit each prompt asks for; a prompt outside the digits task is an error naming ``reward`` and the prompts
    it accepts."""
    digits = []
    for prompt in prompts:
        try:
            digits.append(digit_of_prompt(prompt))
        except ValueError:
            known = ", ".join(repr(p) for p in digit_prompts())
            raise ValueError(f"reward {reward}: unknown digits prompt {prompt!r}; it scores only the ten prompts of the "
                             f"digits task ({known}); use those prompts or choose other rewards in `rewards`") from None
    return digits


def digit_probability(classifier: DigitClassifier, images: Tensor, digits: Tensor) -> Tensor:
    """``softmax(classifier(images))[digits]`` over all 11 classes: ``[N]`` for 8x8 images ``[N, 3, 8, 8]`` in [0, 1] and
    digits ``[N]``. The classifier follows the images' device."""
    param = next(classifier.parameters())
    if param.device != images.device:
        classifier.to(images.device)
    logits = classifier(classifier_pixels(images).to(param.dtype))  # [N, 11]
    return logits.float().softmax(dim=-1).gather(1, digits[:, None]).squeeze(1)  # [N]


def classifier_on(weights: str | Path | None, device: str | torch.device | None) -> DigitClassifier:
    """The digit classifier of ``weights`` (None: the shipped one), on ``device`` when given."""
    classifier = load_digit_classifier(weights)
    return classifier.to(device) if device is not None else classifier


class DigitClassifierReward:
    """Probability of the prompted digit, ``softmax(classifier(image))[digit(prompt)]`` over all 11 classes.

    The softmax includes the not-a-digit class, so an image the classifier rejects scores near 0 for every prompt.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts)
        digits = torch.tensor(prompt_digits(prompts, "digit_classifier"), device=images.device)  # [B]
        return digit_probability(self.classifier, images, digits)  # [B]

    def embed(self, images: Tensor) -> Tensor:
        """Image embedding ``[B, hidden]``: the classifier's hidden layer (the feature space of diversity metrics)."""
        param = next(self.classifier.parameters())
        return self.classifier.net[:3](classifier_pixels(images.to(param.device)).to(param.dtype))  # [B, hidden]


def ink_mass(images: Tensor, low: float = 0.25, high: float = 0.75) -> Tensor:
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


def ink_boldness(images: Tensor, low: float = 0.25, high: float = 0.75, target: float = BOLD_TARGET) -> Tensor:
    """Bounded ink mass ``min(ink_mass, target) / target`` (digits task preference, design.md section 4).

    Ink mass alone is maximised by a frame full of ink (the hack GRPO found). Capped at ``target``, ink
    beyond a bold digit earns nothing, so the best image under ``digit_classifier + w * boldness`` is a
    digit the classifier still accepts whose ink reaches the target: solid white strokes, thickened a
    little, on a black background. A grey or filled background is left to the classifier, whose
    not-a-digit class scores it near 0. ``target`` 0.4 is the ink mass of the boldest real digits (sklearn
    digits: median 0.31, 99th percentile 0.395, the same digits with strokes saturated to white 0.41),
    while the base policy draws 0.30 and a digit dilated once to fill the frame has 0.62. A fixed constant
    (no statistics at run time); piecewise linear, as GRPO needs only the scores.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1], ink bright.
        low: Gray level counted as no ink.
        high: Gray level counted as full ink.
        target: Ink mass that earns the full reward, in (0, 1].

    Returns:
        ``[B]`` float32 in [0, 1]; 1 when ``ink_mass >= target``.
    """
    return ink_mass(images, low, high).clamp(max=target) / target  # [B]


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
    return DigitClassifierReward(classifier_on(weights, device))


@register_reward("boldness", light=True)
def boldness(low: float = 0.25, high: float = 0.75, target: float = BOLD_TARGET,
             device: str | torch.device | None = None) -> RewardFn:
    """Stroke boldness ``ink_boldness``, bounded ink mass (the base policy scores about 0.75 of it).

    ``device`` is accepted like every reward factory's and unused: the score follows the images' device.
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"boldness needs 0 <= low < high <= 1, got low={low}, high={high}; defaults 0.25, 0.75.")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"boldness needs 0 < target <= 1, got target={target}; default {BOLD_TARGET}.")
    return _prompt_free(ink_boldness, low=low, high=high, target=target)


@register_reward("contrast", light=True)
def contrast(device: str | torch.device | None = None) -> RewardFn:
    """Pixel contrast ``ink_contrast`` (``device`` unused, as for ``boldness``)."""
    return _prompt_free(ink_contrast)


@register_reward("brightness", light=True)
def brightness(device: str | torch.device | None = None) -> RewardFn:
    """Mean pixel value over all channels, ``[B]`` in [0, 1], a trivial reward for tests (``device`` unused)."""
    return _prompt_free(image_brightness)
