"""The reward contract and its registry of factories (ddpo-pytorch ``rewards.py`` style, design.md section 5).

A reward is a callable ``(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32``; it does no I/O. Factories
are registered by name and import heavy packages inside their body, so importing flowgrove stays light.
"""

from __future__ import annotations

import difflib
from typing import Callable, Protocol, Sequence, runtime_checkable

from torch import Tensor


@runtime_checkable
class RewardFn(Protocol):
    """Scores images against their prompts; higher is better."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards ``[B]`` float32 for images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts."""
        ...


RewardFactory = Callable[..., RewardFn]
_REWARDS: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register a reward factory under ``name``.

    Args:
        name: Registry key used by ``build_reward`` and the config's reward list.

    Returns:
        A decorator that stores the factory and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({_REWARDS[name].__module__}); pick another name.")
        _REWARDS[name] = factory
        return factory

    return decorator


def reward_names() -> list[str]:
    """Sorted names of the registered rewards."""
    return sorted(_REWARDS)


def build_reward(name: str, **kwargs: object) -> RewardFn:
    """Build the registered reward ``name``.

    Args:
        name: A registered reward (see ``reward_names()``).
        **kwargs: Passed to the factory (weights path, device, options).

    Returns:
        The reward callable.

    Raises:
        ValueError: unknown ``name``; the message lists the known rewards and the closest match.
    """
    if name not in _REWARDS:
        close = difflib.get_close_matches(name, _REWARDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(reward_names())}.{hint}")
    return _REWARDS[name](**kwargs)


def check_reward_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[B, 3, H, W]`` floating point with ``B`` prompts."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"rewards take float images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image.")
