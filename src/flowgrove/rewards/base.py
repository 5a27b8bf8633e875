"""The reward contract and its registry of factories (ddpo-pytorch ``rewards.py`` style, design.md section 5).

A reward is a callable ``(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32``; it does no I/O. Factories
are registered by name and import heavy packages inside their body, so importing flowgrove stays light.
"""

from __future__ import annotations

import inspect
import typing
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from flowgrove.messages import UserFixable
from flowgrove.registry import Registry


@runtime_checkable
class RewardFn(Protocol):
    """Scores images against their prompts; higher is better."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards ``[B]`` float32 for images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts."""
        ...


RewardFactory = Callable[..., RewardFn]
_REWARDS: Registry[RewardFactory] = Registry("reward", "rewards")
_LIGHT: set[str] = set()  # rewards whose factory loads no model: a run's preflight builds them to check them


def register_reward(name: str, light: bool = False) -> Callable[[RewardFactory], RewardFactory]:
    """Register a reward factory under ``name`` (a different factory under a used name raises ``ValueError``).

    ``light``: building the reward loads no model (a server's client, a pixel statistic), so
    :func:`check_reward_options` builds it once, which checks every option and reaches its server, before any model
    of the run loads.
    """
    if light:
        _LIGHT.add(name)
    return _REWARDS.register(name)


def reward_names() -> list[str]:
    """Sorted names of the registered rewards."""
    return _REWARDS.names()


def reward_factory(name: str) -> RewardFactory:
    """The factory registered under ``name`` (``ValueError`` for an unknown name, as :func:`build_reward`)."""
    return _REWARDS.factory(name)


def build_reward(name: str, **kwargs: object) -> RewardFn:
    """Build the registered reward ``name`` with the factory's keyword arguments (weights path, device, options).

    Raises:
        ValueError: unknown ``name``; the message lists the known rewards and the closest match.
    """
    return _REWARDS.build(name, **kwargs)


def check_reward_options(name: str, options: Mapping[str, Any], key: str = "reward_options") -> None:
    """``ValueError`` naming ``{key}.{name}.{option}`` for an option the factory of ``name`` does not take or whose
    value has the wrong type (checked against the factory's annotations); a light reward is then built once, which
    also asks its server (``remote``'s ``/health``). Loads no model."""
    factory = reward_factory(name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = [k for k, p in params.items() if k != "device" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve: no type check, the names still are)
        hints = {}
    for option, value in options.items():
        if option not in allowed and not takes_any:
            raise ValueError(f"{key}.{name}.{option} is not an option of reward {name!r}; it takes: "
                             f"{', '.join(allowed) or 'none'} (its device follows run.device)")
        if option in hints and not _fits(value, hints[option]):
            raise ValueError(f"{key}.{name}.{option}={value!r} must be {_type_name(hints[option])} "
                             f"(reward {name!r}); for example {key}.{name}.{option}={_example(params[option].default)}")
    if name in _LIGHT:
        try:
            factory(**options)
        except (ValueError, UserFixable) as err:  # the factory's own check, or its server that does not answer
            raise type(err)(f"{key}.{name}: {str(err).removeprefix(f'{name}: ')}") from None


_SIMPLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}


def _fits(value: object, hint: object) -> bool:
    """Whether a config value fits a factory annotation (simple types, unions, Optional, Literal; others pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in _SIMPLE:
        return isinstance(value, hint)  # type: ignore[arg-type]
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, dict):
        return isinstance(value, (list, tuple) if origin is not dict else dict)
    return True


def _type_name(hint: object) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    names = [_SIMPLE.get(a, getattr(a, "__name__", str(a))) for a in args]  # type: ignore[call-overload]
    return " or ".join(names) + (" (or null)" if type(None) in typing.get_args(hint) else "")


def _example(default: object) -> str:
    return "VALUE" if default is inspect.Parameter.empty or default is None else repr(default)


def check_reward_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[B, 3, H, W]`` floating point in [0, 1] with ``B`` prompts."""
    if images.ndim == 5:
        raise ValueError(f"rewards take float images [B, 3, H, W] in [0, 1], got videos {tuple(images.shape)}; score "
                         "their frames with flowgrove.rewards.video.VideoReward(reward) (the `video` reward).")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"rewards take float images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image.")
    if images.numel():
        low, high = images.min().item(), images.max().item()  # NaN propagates through min/max
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"rewards take images in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                             "map decoder output x in [-1, 1] with (x / 2 + 0.5).clamp(0, 1).")


def micro_batches(total: int, batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` rows covering ``range(total)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    return [slice(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def reward_device(device: str | torch.device | None) -> torch.device:
    """The device a reward model runs on: ``device``, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def score_in_batches(score: Callable[[Tensor, list[str]], Tensor], images: Tensor, prompts: Sequence[str], *,
                     batch_size: int, device: torch.device, autocast: bool = False) -> Tensor:
    """Check the inputs, then ``score`` micro-batches on ``device`` in inference mode.

    Args:
        score: ``(images [b, 3, H, W] on device, prompts) -> [b]``.
        images: ``[B, 3, H, W]`` float in [0, 1], any device.
        prompts: ``B`` prompts.
        batch_size: Rows per call of ``score``.
        device: Where the model is.
        autocast: fp16 autocast on CUDA, as the references run HPS (ignored on other devices).

    Returns:
        ``[B]`` float32 on the images' device.
    """
    check_reward_inputs(images, prompts)
    amp = torch.autocast("cuda", dtype=torch.float16) if autocast and device.type == "cuda" else nullcontext()
    rows = []
    with torch.inference_mode(), amp:
        for part in micro_batches(len(prompts), batch_size):
            rows.append(score(images[part].to(device), list(prompts[part])).float())  # [b]
    return torch.cat(rows).to(images.device) if rows else images.new_zeros(0, dtype=torch.float32)
