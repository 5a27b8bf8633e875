"""Image rewards on videos: score ``frames`` evenly spaced frames of ``[B, F, 3, H, W]`` and reduce them per video.

All sampled frames of a batch go through the image reward in one call (``[B * frames, 3, H, W]``, each with its
video's prompt); ``reduce`` is ``mean`` (GenRL's video OCR) or ``min`` (the worst frame decides). Image batches
``[B, 3, H, W]`` pass straight through, so a video reward also scores single frames.

A reward declares that it takes videos with ``takes_videos = True`` (:func:`takes_videos`); the training setup wraps
every other reward of a video policy in :class:`VideoReward` with the defaults below.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from flowgrove.rewards.base import RewardFn, build_reward, register_reward

FRAMES = 4  # frames scored per video by default
REDUCE = "mean"  # how their scores make the video's by default

REDUCERS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda s: s.mean(dim=1),
    "min": lambda s: s.min(dim=1).values,
}


def frame_indices(num_frames: int, count: int) -> Tensor:
    """``min(count, num_frames)`` evenly spaced frame indices ``[n]`` long from 0 to ``num_frames - 1``.

    ``count`` 0 takes every frame; one frame is the middle one.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}.")
    n = num_frames if count <= 0 else min(count, num_frames)
    if n == 1:
        return torch.tensor([(num_frames - 1) // 2])
    return torch.linspace(0, num_frames - 1, n).round().long()  # [n]


def reduce_frames(scores: Tensor, how: str = "mean") -> Tensor:
    """Per-video rewards ``[B]`` from per-frame scores ``[B, n]``."""
    if how not in REDUCERS:
        raise ValueError(f"video reduce={how!r} is unknown; allowed: {', '.join(REDUCERS)}.")
    return REDUCERS[how](scores)


def takes_videos(reward: RewardFn) -> bool:
    """Whether ``reward`` declares that it scores videos ``[B, F, 3, H, W]`` itself (``takes_videos = True``);
    other rewards take images ``[B, 3, H, W]``."""
    return bool(getattr(reward, "takes_videos", False))


class VideoReward:
    """An image reward applied to sampled frames of each video, reduced per video."""

    takes_videos = True

    def __init__(self, image_reward: RewardFn, frames: int = FRAMES, reduce: str = REDUCE) -> None:
        reduce_frames(torch.zeros(1, 1), reduce)  # an unknown reducer fails when the reward is built
        self.image_reward, self.frames, self.reduce = image_reward, frames, reduce

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        if videos.ndim == 4:
            return self.image_reward(videos, prompts)
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"video rewards take [B, F, 3, H, W] (or images [B, 3, H, W]), got {tuple(videos.shape)}.")
        b = videos.shape[0]
        if len(prompts) != b:
            raise ValueError(f"got {b} videos but {len(prompts)} prompts; pass one prompt per video.")
        index = frame_indices(videos.shape[1], self.frames).to(videos.device)
        frames = videos.index_select(1, index)  # [B, n, 3, H, W]
        n = frames.shape[1]
        repeated = [p for p in prompts for _ in range(n)]
        scores = self.image_reward(frames.flatten(0, 1), repeated).float().view(b, n)  # [B, n]
        return reduce_frames(scores, self.reduce)  # [B]


@register_reward("video")
def video(reward: str = "ocr", frames: int = FRAMES, reduce: str = REDUCE, options: dict | None = None,
          device: str | torch.device | None = None) -> VideoReward:
    """Any image reward on videos [B, F, 3, H, W]: ``reward`` built with ``options`` scores sampled frames, reduced by mean or min."""
    kwargs = dict(options or {})
    if device is not None:
        kwargs.setdefault("device", device)
    return VideoReward(build_reward(reward, **kwargs), frames, reduce)
