"""Video rewards: frame sampling and the mean/min reducers by hand, any image reward on [B, F, 3, H, W]."""

from __future__ import annotations

import pytest
import torch

from flowgrove.rewards import build_reward
from flowgrove.rewards.video import VideoReward, frame_indices, reduce_frames


def ramp_videos(num_frames: int, offsets: list[float]) -> torch.Tensor:
    """Videos ``[B, F, 3, 2, 2]`` whose frame f is constant ``offset + f / (F - 1) / 2``."""
    steps = torch.arange(num_frames) / (num_frames - 1) / 2  # [F]
    values = torch.tensor(offsets)[:, None] + steps  # [B, F]
    return values[:, :, None, None, None].expand(-1, -1, 3, 2, 2).contiguous()


def test_frame_indices_are_evenly_spaced():
    assert frame_indices(9, 3).tolist() == [0, 4, 8]
    assert frame_indices(5, 4).tolist() == [0, 1, 3, 4]  # linspace 0, 1.33, 2.67, 4 rounded
    assert frame_indices(3, 10).tolist() == [0, 1, 2]  # never more than the video has
    assert frame_indices(6, 0).tolist() == list(range(6))  # 0 = every frame
    assert frame_indices(7, 1).tolist() == [3]  # the middle frame
    with pytest.raises(ValueError, match="at least one frame"):
        frame_indices(0, 2)


def test_reducers_by_hand():
    scores = torch.tensor([[0.2, 0.4, 0.9], [1.0, 0.0, 0.5]])
    torch.testing.assert_close(reduce_frames(scores, "mean"), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(reduce_frames(scores, "min"), torch.tensor([0.2, 0.0]))
    with pytest.raises(ValueError, match="allowed: mean, min"):
        reduce_frames(scores, "median")


def test_video_reward_scores_sampled_frames_of_each_video():
    # 5 frames, brightness offset + f/8: frames 0, 2, 4 give offset + 0, 0.25, 0.5 -> mean offset + 0.25, min offset.
    videos = ramp_videos(5, [0.0, 0.25])
    mean = build_reward("video", reward="brightness", frames=3, reduce="mean")
    lowest = build_reward("video", reward="brightness", frames=3, reduce="min")
    torch.testing.assert_close(mean(videos, ["a", "b"]), torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(lowest(videos, ["a", "b"]), torch.tensor([0.0, 0.25]))
    images = videos[:, 0]  # [B, 3, H, W] passes straight to the image reward
    torch.testing.assert_close(mean(images, ["a", "b"]), torch.tensor([0.0, 0.25]))


def test_video_reward_calls_the_image_reward_once_with_each_frames_prompt():
    calls = []

    def recorder(images, prompts):
        calls.append((tuple(images.shape), list(prompts)))
        return images.mean(dim=(1, 2, 3))

    VideoReward(recorder, frames=2)(ramp_videos(4, [0.0, 0.1, 0.2]), ["x", "y", "z"])
    assert calls == [((6, 3, 2, 2), ["x", "x", "y", "y", "z", "z"])]


def test_video_reward_errors():
    reward = build_reward("video", reward="brightness")
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        reward(torch.zeros(2, 4, 1, 2, 2), ["a", "b"])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        reward(torch.zeros(2, 4, 3, 2, 2), ["a"])
    with pytest.raises(ValueError, match="reduce="):
        build_reward("video", reward="brightness", reduce="max")
    with pytest.raises(ValueError, match="unknown reward 'brightnes'"):
        build_reward("video", reward="brightnes")


def test_video_ocr_min_is_decided_by_the_blank_frame():
    pytest.importorskip("onnxruntime")
    from test_rewards_ocr import render

    word = render("cat")  # [3, 32, 96]
    clip = torch.stack([word, word, torch.ones_like(word), word])[None]  # [1, 4, 3, 32, 96], frame 2 blank
    prompt = ['a sign that says "cat"']
    assert build_reward("video", reward="ocr", frames=0, reduce="mean")(clip, prompt).item() == pytest.approx(0.75)
    assert build_reward("video", reward="ocr", frames=0, reduce="min")(clip, prompt).item() == 0.0
