"""The embedded ``digits`` task: sklearn's 8x8 handwritten digits, its prompts and its shipped weight files.

Images are ``[N, 1, 8, 8]`` float32 in [-1, 1] (sklearn's ink counts 0..16 mapped by ``v / 16 * 2 - 1``, so
ink is +1 and background -1); labels are ``[N]`` long. The digit classifier also learns a "not a digit" class
(``NOT_A_DIGIT``) from images that ``not_a_digit`` makes out of real digits, and sees real digits with
saturated strokes (``saturate_ink``) as digits, so that its probability rewards bolder digits, not ink.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

NOT_A_DIGIT = 10  # label of the classifier's extra class
NEGATIVE_FAMILIES = ("inverted", "filled", "grey_background", "noise", "two_digits", "speckle")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PRETRAIN_HINT = "run `flowgrove pretrain digits` to (re)create the shipped weights"


class DigitsData(NamedTuple):
    """Digit images with their labels."""

    images: Tensor  # [N, 1, 8, 8] float32 in [-1, 1]
    labels: Tensor  # [N] long, 0..9


class DigitsSplit(NamedTuple):
    """A fixed train / held-out split of the digits."""

    train: DigitsData
    heldout: DigitsData


def digit_prompts() -> list[str]:
    """The ten prompts of the digits task, index = digit: ``["a handwritten zero", ..., "a handwritten nine"]``."""
    return [f"a handwritten {word}" for word in DIGIT_WORDS]


def digit_of_prompt(prompt: str) -> int:
    """The digit a prompt asks for (``"a handwritten seven"`` -> 7).

    Raises:
        ValueError: ``prompt`` is not one of ``digit_prompts()``; the message lists them.
    """
    prompts = digit_prompts()
    key = " ".join(str(prompt).lower().split())
    if key not in prompts:
        raise ValueError(f"unknown digits prompt {prompt!r}; the digits task knows exactly: {prompts}.")
    return prompts.index(key)


def load_digits_tensors() -> DigitsData:
    """All 1797 sklearn digits as tensors (``sklearn.datasets.load_digits``, offline; Alpaydin & Kaynak 1998).

    Returns:
        ``DigitsData`` with images ``[1797, 1, 8, 8]`` in [-1, 1] and labels ``[1797]``.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0  # [N, 1, 8, 8]
    labels = torch.as_tensor(raw.target, dtype=torch.long)  # [N]
    return DigitsData(images, labels)


def split_digits(data: DigitsData, heldout_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """A fixed random split: ``randperm(N)`` from a generator seeded with ``seed``, the first part held out.

    Args:
        data: The digits to split.
        heldout_fraction: Fraction of rows held out, in (0, 1).
        seed: Seed of the permutation; the same seed always gives the same split.

    Returns:
        ``DigitsSplit(train, heldout)``.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}; 0.2 holds out a fifth.")
    n = data.labels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # [N]
    n_heldout = int(round(n * heldout_fraction))
    held, train = perm[:n_heldout], perm[n_heldout:]
    return DigitsSplit(
        train=DigitsData(data.images[train], data.labels[train]),
        heldout=DigitsData(data.images[held], data.labels[held]),
    )


def dilate_ink(ink: Tensor, times: int) -> Tensor:
    """Grey dilation with the 4-neighbour cross, ``times`` times: each pixel becomes the max of itself and its
    up, down, left and right neighbours (zero padding). ``ink`` is ``[N, 1, H, W]`` in [0, 1], ink bright."""
    for _ in range(times):
        p = torch.nn.functional.pad(ink, (1, 1, 1, 1))  # [N, 1, H + 2, W + 2]
        neighbours = (p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:])
        ink = torch.stack([ink, *neighbours]).amax(dim=0)  # [N, 1, H, W]
    return ink


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """One ``U(low, high)`` draw per row, ``[N, 1, 1, 1]``."""
    return low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)  # [N, 1, 1, 1]


def saturate_ink(images: Tensor, generator: torch.Generator, fraction: float = 0.5,
                 lowest: float = 0.35) -> Tensor:
    """Bold versions of real digits: ink ``u`` becomes ``min(u / s, 1)`` with ``s ~ U(lowest, 1)``, for a
    random ``fraction`` of the rows (the others are returned unchanged). Strokes turn solid white while the
    black background stays black: the look the ``boldness`` reward asks for, labelled as the same digit.

    Args:
        images: Digits ``[N, 1, 8, 8]`` in [-1, 1].
        generator: Source of ``s`` and of the row choice.
        fraction: Share of rows made bold, in [0, 1].
        lowest: Smallest divisor ``s`` in (0, 1]; 0.35 saturates every pixel above 35% ink.

    Returns:
        Images ``[N, 1, 8, 8]`` in [-1, 1].
    """
    if not (0.0 <= fraction <= 1.0 and 0.0 < lowest <= 1.0):
        raise ValueError(f"saturate_ink needs 0 <= fraction <= 1 and 0 < lowest <= 1, got fraction={fraction}, "
                         f"lowest={lowest}; defaults 0.5, 0.35.")
    n = images.shape[0]
    s = _uniform(n, lowest, 1.0, generator)  # [N, 1, 1, 1]
    chosen = torch.rand(n, 1, 1, 1, generator=generator) < fraction  # [N, 1, 1, 1]
    ink = ((images + 1) / 2 / torch.where(chosen, s, torch.ones_like(s))).clamp(0, 1)  # [N, 1, 8, 8]
    return ink * 2 - 1


def not_a_digit(images: Tensor, labels: Tensor, family: str, generator: torch.Generator) -> Tensor:
    """Images that are not a digit, made from real digits (background class; Dhamija et al. 2018).

    Families (ink ``u`` in [0, 1]): ``inverted`` ``1 - u``; ``filled`` dilated 1 or 2 times (the strokes fill
    the frame); ``grey_background`` ``max(u, b)`` with a grey field ``b = U(0.2, 0.9) + 0.15 N(0, 1)``;
    ``noise`` uniform pixels up to ``U(0.5, 1)``; ``two_digits`` ``max(u, u')`` with a digit of another label
    (the rows rolled; same-label partners are rotated 180 degrees); ``speckle`` a ``U(0.2, 0.5)`` share of the
    pixels set to ``U(0.5, 1)``.

    Args:
        images: Digits ``[N, 1, 8, 8]`` in [-1, 1].
        labels: Their labels ``[N]``.
        family: One of ``NEGATIVE_FAMILIES``.
        generator: Source of every random draw.

    Returns:
        Images ``[N, 1, 8, 8]`` in [-1, 1].
    """
    if family not in NEGATIVE_FAMILIES:
        raise ValueError(f"unknown negative family {family!r}; choose one of {NEGATIVE_FAMILIES}.")
    ink = (images + 1) / 2  # [N, 1, 8, 8]
    n = ink.shape[0]
    if family == "inverted":
        out = 1 - ink
    elif family == "filled":
        out = dilate_ink(ink, int(torch.randint(1, 3, (1,), generator=generator)))
    elif family == "grey_background":
        field = _uniform(n, 0.2, 0.9, generator) + 0.15 * torch.randn(ink.shape, generator=generator)  # [N, 1, 8, 8]
        out = torch.maximum(ink, field.clamp(0, 1))
    elif family == "noise":
        out = torch.rand(ink.shape, generator=generator) * _uniform(n, 0.5, 1.0, generator)
    elif family == "two_digits":
        shift = int(torch.randint(1, n, (1,), generator=generator)) if n > 1 else 0
        other = ink.roll(shift, 0)  # [N, 1, 8, 8]
        same = (labels.roll(shift, 0) == labels).view(-1, 1, 1, 1)  # [N, 1, 1, 1]
        out = torch.maximum(ink, torch.where(same, other.flip(-1, -2), other))
    else:  # speckle
        mask = torch.rand(ink.shape, generator=generator) < _uniform(n, 0.2, 0.5, generator)  # [N, 1, 8, 8]
        out = torch.where(mask, 0.5 + 0.5 * torch.rand(ink.shape, generator=generator), ink)
    return out * 2 - 1  # [N, 1, 8, 8]


def assets_dir() -> Path:
    """The package folder that holds the shipped digits weights (``flowgrove/assets``)."""
    return Path(str(resources.files("flowgrove") / "assets"))


def save_weights(path: str | Path, tensors: dict[str, Tensor], config: dict) -> Path:
    """Write ``tensors`` and a JSON ``config`` (safetensors metadata) atomically: temporary name, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    os.chmod(tmp, 0o644)  # safetensors creates files owner-only; these ship inside the package
    os.replace(tmp, path)
    return path


def load_weights(path: str | Path, what: str, hint: str = PRETRAIN_HINT) -> tuple[dict[str, Tensor], dict]:
    """Read a file written by ``save_weights`` (no unpickling) with errors that say how to recreate it.

    Args:
        path: The safetensors file.
        what: What the file holds, for the error message (e.g. "digits policy").
        hint: How to recreate the file, for the error message.

    Returns:
        ``(tensors, config)`` on the CPU.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a readable safetensors file with a config.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}; {hint}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            config = json.loads((handle.metadata() or {})["config"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several private error types for damaged files
        raise ValueError(f"{what} weights at {path} are unreadable or corrupt ({error}); {hint}.") from error
    return tensors, config
