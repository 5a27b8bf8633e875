"""The embedded ``digits`` task: sklearn's 8x8 handwritten digits, its prompts and its shipped weight files.

Images are ``[N, 1, 8, 8]`` float32 in [-1, 1] (sklearn's ink counts 0..16 mapped by ``v / 16 * 2 - 1``, so
ink is +1 and background -1); labels are ``[N]`` long.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

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


def load_weights(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict]:
    """Read a file written by ``save_weights`` (no unpickling) with errors that say how to recreate it.

    Args:
        path: The safetensors file.
        what: What the file holds, for the error message (e.g. "digits policy").

    Returns:
        ``(tensors, config)`` on the CPU.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a readable safetensors file with a config.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}; {PRETRAIN_HINT}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            config = json.loads((handle.metadata() or {})["config"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several private error types for damaged files
        raise ValueError(f"{what} weights at {path} are unreadable or corrupt ({error}); {PRETRAIN_HINT}.") from error
    return tensors, config
