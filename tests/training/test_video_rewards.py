"""Image rewards on a video policy (the tiny diffusers Wan) score frames as the ``video`` reward does, by default and
with one note line each; rewards that take videos, and every reward of an image policy, are left as they are."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.cli import main  # noqa: E402
from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.rewards import build_reward  # noqa: E402
from flowgrove.rewards.video import VideoReward  # noqa: E402
from flowgrove.training.setup import rewards_for  # noqa: E402

OPTIONS = "{num_frames: 5, height: 16, width: 16, max_sequence_length: 8, guidance_scale: 1.0}"
NOTE = ("flowgrove: reward 'brightness' scores 4 evenly spaced frames of each video, mean over them (as reward 'video' "
        "does); for others set rewards={video: W} and reward_options.video={reward: brightness, frames: N, "
        "reduce: min}")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from test_wan import save_tiny_wan_pipeline

    path = tmp_path_factory.mktemp("tiny_wan")
    save_tiny_wan_pipeline(path)
    return path


def test_wan_trains_with_an_image_reward_and_an_image_judge(wan_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    run = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(run), "policy.name=wan", f"policy.path={wan_dir}",
                 "policy.dtype=float32", f"policy.options={OPTIONS}", "rollout.prompts_per_step=1",
                 "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3", "eval.samples_per_prompt=1",
                 f"data.train={prompts}", "rewards={brightness: 1.0}", "eval.judges=[contrast]", "run.device=cpu",
                 "run.progress=false"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowgrove: reward")]
    assert notes[0] == NOTE and len(notes) == 2 and "reward 'contrast' scores 4 evenly spaced frames" in notes[1]
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < step["reward/brightness"] < 1
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["eval_end"]["judge/contrast"] <= 1, summary


def test_only_image_rewards_of_a_video_policy_score_frames(wan_dir, tiny_policy, capsys):
    brightness, video = build_reward("brightness"), build_reward("video", reward="contrast", frames=2)
    assert rewards_for(tiny_policy, {"brightness": brightness}) == {"brightness": brightness}  # an image policy
    assert "flowgrove:" not in capsys.readouterr().err
    wan = build_policy("wan", path=str(wan_dir), dtype="float32", num_frames=5, height=16, width=16,
                       max_sequence_length=8)
    scored = rewards_for(wan, {"brightness": brightness, "video": video})
    assert scored["video"] is video and isinstance(scored["brightness"], VideoReward)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowgrove:")] == [NOTE]
    videos = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [B, F, 3, H, W]
    frames = videos[:, [0, 1, 3, 4]]  # 4 evenly spaced of 5
    torch.testing.assert_close(scored["brightness"](videos, ["a cat", "a dog"]), frames.mean(dim=(1, 2, 3, 4)))
