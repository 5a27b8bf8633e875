"""Building the trainer component from a config: the policy (LoRA, dtype, checkpointing), the rewards and the
prompt sets, handed to :class:`~flowgrove.training.trainer.GRPOTrainer`. Shared by the recipes (train, sample, bench)."""

from __future__ import annotations

from typing import Mapping

import torch

from flowgrove.config.schema import Config
from flowgrove.messages import note
from flowgrove.parallel import distributed, engine, rank_share
from flowgrove.policies.base import FlowPolicy, makes_videos
from flowgrove.rewards import RewardFn, build_reward
from flowgrove.rewards.video import FRAMES, REDUCE, VideoReward, takes_videos
from flowgrove.training.parts import build_parts
from flowgrove.training.prepare import offload_text_encoders, prepare_policy
from flowgrove.training.preflight import preflight
from flowgrove.training.prompts import PromptFiles, load_prompt_sets
from flowgrove.training.trainer import GRPOTrainer


def build_trainer(cfg: Config, files: PromptFiles | None = None) -> GRPOTrainer:
    """Policy, LoRA, rewards, prompts, engine and optimizer for ``cfg``, handed to the trainer. Seeds the global RNG.
    The device is resolved, the global batch checked and the run's preflight done (unless its ``files`` are
    given: it was done), once, before any model loads."""
    device = distributed.resolve_device(cfg.run.device)
    world, _ = distributed.init_from_env(device, cfg.run.collective_timeout)
    rank_share.check_global_batch(cfg, world)  # before any model loads
    engine.choose_kind(cfg.run.parallel, world, cfg.policy.lora_rank, cfg.run.offload)  # run.offload's engine, too
    files = files or preflight(cfg)
    if cfg.run.threads > 0:  # torch's default (one per core) is 4-17x slower on a busy machine (README)
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.train.seed)
    policy = prepare_policy(cfg, device)
    rewards = {name: build_reward(name, device=device, **cfg.reward_options.get(name, {}))
               for name, w in cfg.rewards.items() if float(w) != 0}
    if not rewards:
        raise ValueError("every reward weight is 0; give at least one reward a nonzero weight in `rewards`")
    rewards = rewards_for(policy, rewards)
    data = load_prompt_sets(cfg, policy, files)
    parts = build_parts(cfg, policy, device)  # the engine (FSDP2 shards the policy in place) and the optimizer
    trainer = GRPOTrainer(cfg, policy, rewards, data.train, data.test, data.rows, parts)  # encodes the prompts once
    if cfg.policy.offload_text_encoders:
        offload_text_encoders(policy)
    return trainer


def rewards_for(policy: FlowPolicy, rewards: Mapping[str, RewardFn]) -> dict[str, RewardFn]:
    """``rewards`` as they score the policy's samples: on a video policy (:func:`makes_videos`) every reward that
    does not take videos (:func:`takes_videos`) scores evenly spaced frames of each video, as the ``video`` reward
    does by default, with one note line per reward; image policies' rewards are returned as they are."""
    if not makes_videos(policy):
        return dict(rewards)
    scored = {}
    for name, reward in rewards.items():
        if not takes_videos(reward):
            note(f"reward {name!r} scores {FRAMES} evenly spaced frames of each video, {REDUCE} over them (as reward "
                 f"'video' does); for others set rewards={{video: W}} and reward_options.video={{reward: {name}, "
                 "frames: N, reduce: min}")
            reward = VideoReward(reward)
        scored[name] = reward
    return scored
