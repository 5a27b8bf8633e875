"""Periodic evaluation (compute only, no I/O): fixed test prompts and seeds, Euler ODE samples, the trained rewards
and the judges (rewards not trained on), within-prompt diversity, MMD^2 to the base model's samples on the same
prompts and seeds, and the KL of the policy's transitions to the base model's along the evaluation rollouts.

The samples are exactly those of :meth:`GRPOTrainer.evaluate` (same seed, grid and EMA swap), so
``eval/reward`` at a step equals the held-out reward of that step. ``docs/evaluation.md`` explains each number.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from flowgrove import method
from flowgrove.config import Config
from flowgrove.diversity import group_diversity, mmd2_unbiased
from flowgrove.losses import transition_kl
from flowgrove.policies.base import Conditioning
from flowgrove.rewards import build_reward
from flowgrove.rewards.base import RewardFn
from flowgrove.rewards.parallel import score_rewards
from flowgrove.rollout import batched_velocity, decode_batched
from flowgrove.samplers.dpm_solver import sample_euler
from flowgrove.samplers.steps import euler_step, noise_g, sde_step
from flowgrove.trainer import GRPOTrainer, weighted_total


@dataclass
class Trajectory:
    """An evaluation rollout: Euler ODE states and the policy's velocities at each of its S steps."""

    states: list[Tensor]  # S x [N, *latent] (CPU): x at sigmas[i]
    velocities: list[Tensor]  # S x [N, *latent] (CPU): the policy's velocity at states[i]
    sigmas: Tensor  # [S + 1]
    images: Tensor  # [N, 3, H, W] (videos [N, F, 3, H, W]) in [0, 1]


@dataclass
class EvalSetup:
    """What every evaluation of a run compares against: judges, the base weights and the base samples' features."""

    judges: dict[str, RewardFn]
    base: list[Tensor] | None  # the base model's trainable weights (CPU); None: no diversity/MMD^2/KL baseline
    base_features: Tensor | None = None  # [N, D] features of the base model's evaluation samples
    base_diversity: float = math.nan


@dataclass
class EvalRecord:
    """One evaluation: ``metrics`` ({"step", "eval/...": float}) and its sample grid images [N, 3, H, W]."""

    metrics: dict[str, float]
    images: Tensor


def check_judges(cfg: Config) -> list[str]:
    """``eval.judges`` names; a judge that is also trained on (nonzero weight) is an error."""
    trained = {n for n, w in cfg.rewards.items() if float(w) != 0}
    for name in cfg.eval.judges:
        if name in trained:
            raise ValueError(f"eval.judges lists {name!r}, which is trained on (rewards.{name}={cfg.rewards[name]}); "
                             f"a judge must be a reward not trained on: remove it from eval.judges or from rewards")
    return [str(n) for n in cfg.eval.judges]


def build_judges(cfg: Config, device: torch.device | str) -> dict[str, RewardFn]:
    """The judge rewards of ``eval.judges``, with their ``reward_options``."""
    return {n: build_reward(n, device=device, **cfg.reward_options.get(n, {})) for n in check_judges(cfg)}


def snapshot(trainer: GRPOTrainer) -> list[Tensor]:
    """CPU copies of the trainer's trainable weights (taken before training or loading a checkpoint: the base)."""
    source = trainer.reference if trainer.reference is not None else trainer.params
    return [p.detach().to("cpu", copy=True) for p in source]


def _eval_rows(trainer: GRPOTrainer) -> Tensor:
    return torch.arange(len(trainer.test_prompts)).repeat_interleave(trainer.cfg.eval.samples_per_prompt)  # [N]


@torch.no_grad()
def ode_trajectory(trainer: GRPOTrainer) -> Trajectory:
    """The evaluation's Euler ODE samples (as :func:`flowgrove.trainer.ode_images`), keeping every state."""
    cfg, policy = trainer.cfg, trainer.policy
    rows, sigmas = _eval_rows(trainer), method.base_sigmas(cfg, cfg.eval.num_steps)  # [N], [S + 1]
    gen = torch.Generator().manual_seed(cfg.eval.seed)
    device = next(policy.module.parameters()).device
    x = torch.randn((rows.shape[0], *policy.latent_shape), generator=gen).to(device)  # [N, *latent]
    cond_rows = trainer.test_cond.to(device).select(rows.to(device))
    states, velocities = [], []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = batched_velocity(policy, x, x.new_full((x.shape[0],), float(sigma)), cond_rows, cfg.sampler.chunk_size)
        states.append(x.cpu())
        velocities.append(v.cpu())
        x = euler_step(x, v, sigma, sigma_next)
    return Trajectory(states, velocities, sigmas, decode_batched(policy, x, cfg.rollout.decode_batch))


@torch.no_grad()
def kl_to_base(trainer: GRPOTrainer, traj: Trajectory, base: list[Tensor]) -> float:
    """Mean over samples of the summed KL of the policy's SDE transitions (the training sampler's ``g``) to the
    base model's, at the states of the policy's evaluation rollout. NaN when the sampler's noise level is 0."""
    s = trainer.cfg.sampler
    if s.noise_level <= 0:
        return math.nan
    device = next(trainer.policy.module.parameters()).device
    cond_rows = trainer.test_cond.to(device).select(_eval_rows(trainer).to(device))
    total = torch.zeros(traj.states[0].shape[0], dtype=torch.float64)  # [N]
    with trainer.weights_swapped(base):
        for i, (x, v) in enumerate(zip(traj.states, traj.velocities)):
            sigma, sigma_next = float(traj.sigmas[i]), float(traj.sigmas[i + 1])
            x = x.to(device)
            v_base = batched_velocity(trainer.policy, x, x.new_full((x.shape[0],), sigma), cond_rows, s.chunk_size)
            g = noise_g(s.noise, s.noise_level, sigma, sigma_next)
            zeros = torch.zeros_like(x)
            mine = sde_step(x, v.to(device), sigma, sigma_next, g, noise=zeros)
            theirs = sde_step(x, v_base, sigma, sigma_next, g, noise=zeros)
            total += transition_kl(mine.mean, theirs.mean, mine.std).double().cpu()  # [N]
    return total.mean().item()


def features(images: Tensor, *rewards: Mapping[str, RewardFn]) -> Tensor:
    """Diversity features [N, D]: the image embedding of the first reward with ``embed(images)`` (judges are passed
    first), else the pixels."""
    for judge in (fn for group in rewards for fn in group.values()):
        embed = getattr(judge, "embed", None)
        if callable(embed):
            return embed(images).float().flatten(1).cpu()
    return images.float().flatten(1).cpu()


def _diversity(feats: Tensor, group: int) -> float:
    return group_diversity(feats, group).item() if group >= 2 else math.nan


@torch.no_grad()
def build_setup(trainer: GRPOTrainer, base: list[Tensor] | None) -> EvalSetup:
    """Judges, and the base model's evaluation samples (``base`` weights, no EMA) as the diversity baseline."""
    setup = EvalSetup(build_judges(trainer.cfg, trainer.device), base)
    if base is not None:
        with trainer.weights_swapped(base):
            images = ode_trajectory(trainer).images
        setup.base_features = features(images, setup.judges, trainer.rewards)
        setup.base_diversity = _diversity(setup.base_features, trainer.cfg.eval.samples_per_prompt)
    return setup


def _scores(trainer: GRPOTrainer, setup: EvalSetup, images: Tensor) -> dict[str, float]:
    prompts = [trainer.test_prompts[i] for i in _eval_rows(trainer).tolist()]
    raw = torch.stack([r.cpu() for r in score_rewards(trainer.rewards, images, prompts)])  # [K, N]
    out = {"eval/reward": weighted_total(raw, trainer.weights).mean().item()}
    out.update({f"eval/reward/{name}": raw[k].mean().item() for k, name in enumerate(trainer.rewards)})
    if setup.judges:
        judged = score_rewards(setup.judges, images, prompts)
        out.update({f"eval/judge/{name}": judged[k].float().mean().item() for k, name in enumerate(setup.judges)})
    return out


@torch.no_grad()
def evaluate_step(trainer: GRPOTrainer, setup: EvalSetup) -> EvalRecord:
    """One periodic evaluation of the trainer's current policy (EMA weights when enabled)."""
    with trainer.weights_swapped(trainer.ema) if trainer.ema is not None else nullcontext():
        traj = ode_trajectory(trainer)
        kl = kl_to_base(trainer, traj, setup.base) if setup.base is not None else math.nan
    metrics = {"step": trainer.iteration, **_scores(trainer, setup, traj.images)}
    feats = features(traj.images, setup.judges, trainer.rewards)
    metrics["eval/diversity"] = _diversity(feats, trainer.cfg.eval.samples_per_prompt)
    if setup.base_features is not None:
        metrics["eval/diversity_ratio"] = metrics["eval/diversity"] / setup.base_diversity
        metrics["eval/mmd2"] = mmd2_unbiased(feats, setup.base_features).item() if feats.shape[0] >= 2 else math.nan
        metrics["eval/kl"] = kl
    return EvalRecord(metrics, traj.images)


@torch.no_grad()
def hybrid_images(trainer: GRPOTrainer, base: list[Tensor], cond: Conditioning, rows: Tensor, sigmas: Tensor, seed: int,
                  trained_steps: int) -> Tensor:
    """MixGRPO's hybrid inference: Euler ODE with the trainer's current weights for the first ``trained_steps`` of
    the grid ``sigmas`` [S + 1], then with the ``base`` weights; noise from ``seed`` as :func:`ode_images`.
    Returns images [N, 3, H, W] (videos [N, F, 3, H, W])."""
    policy, s = trainer.policy, trainer.cfg.sampler
    gen = torch.Generator().manual_seed(seed)
    device = next(policy.module.parameters()).device
    x = torch.randn((rows.shape[0], *policy.latent_shape), generator=gen).to(device)  # [N, *latent]
    cond_rows = cond.to(device).select(rows.to(device))

    def velocity(z: Tensor, sigma: Tensor) -> Tensor:
        return batched_velocity(policy, z, z.new_full((z.shape[0],), float(sigma)), cond_rows, s.chunk_size)

    k = max(0, min(trained_steps, sigmas.shape[0] - 1))
    x = sample_euler(velocity, x, sigmas[:k + 1])
    with trainer.weights_swapped(base):
        x = sample_euler(velocity, x, sigmas[k:])
    return decode_batched(policy, x, trainer.cfg.rollout.decode_batch)
