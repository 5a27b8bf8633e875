"""The reward contract and its registry of factories (ddpo-pytorch ``rewards.py`` style, design.md section 5).

A reward is a callable ``(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32``; it does no I/O. Factories
are registered by name and import heavy packages inside their body, so importing flowgrove stays light.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from torch import Tensor

from flowgrove.registry import Registry


@runtime_checkable
class RewardFn(Protocol):
    """Scores images against their prompts; higher is better."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards ``[B]`` float32 for images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts."""
        ...


RewardFactory = Callable[..., RewardFn]
_REWARDS: Registry[RewardFactory] = Registry("reward", "rewards")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register a reward factory under ``name`` (a different factory under a used name raises ``ValueError``)."""
    return _REWARDS.register(name)


def reward_names() -> list[str]:
    """Sorted names of the registered rewards."""
    return _REWARDS.names()


def build_reward(name: str, **kwargs: object) -> RewardFn:
    """Build the registered reward ``name`` with the factory's keyword arguments (weights path, device, options).

    Raises:
        ValueError: unknown ``name``; the message lists the known rewards and the closest match.
    """
    return _REWARDS.build(name, **kwargs)


def check_reward_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[B, 3, H, W]`` floating point with ``B`` prompts."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"rewards take float images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image.")
