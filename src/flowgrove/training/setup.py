"""Building the trainer component from a config: the policy (LoRA, dtype, checkpointing), the rewards and the
prompt sets, handed to :class:`~flowgrove.training.trainer.GRPOTrainer`. Shared by the recipes (train, sample, bench)."""

from __future__ import annotations

import torch

from flowgrove.config.schema import Config
from flowgrove.parallel import distributed, rank_share
from flowgrove.rewards import build_reward
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
    files = files or preflight(cfg)
    if cfg.run.threads > 0:  # torch's default (one per core) is 4-17x slower on a busy machine (README)
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.train.seed)
    policy = prepare_policy(cfg, device)
    rewards = {name: build_reward(name, device=device, **cfg.reward_options.get(name, {}))
               for name, w in cfg.rewards.items() if float(w) != 0}
    if not rewards:
        raise ValueError("every reward weight is 0; give at least one reward a nonzero weight in `rewards`")
    data = load_prompt_sets(cfg, policy, files)
    parts = build_parts(cfg, policy, device)  # the engine (FSDP2 shards the policy in place) and the optimizer
    trainer = GRPOTrainer(cfg, policy, rewards, data.train, data.test, data.rows, parts)  # encodes the prompts once
    if cfg.policy.offload_text_encoders:
        offload_text_encoders(policy)
    return trainer
