"""Periodic evaluation (compute only, no I/O): fixed test prompts and seeds, Euler ODE samples, the trained rewards
and the judges (rewards not trained on), within-prompt diversity, MMD^2 to the base model's samples on the same
prompts and seeds, and the KL of the policy's transitions to the base model's along the evaluation rollouts.

The samples are exactly those of :meth:`GRPOTrainer.evaluate` (same seed, grid and EMA swap), so
``eval/reward`` at a step equals the held-out reward of that step; like it, they are split across ranks
(``heldout.py``) and every rank ends with the same numbers. With ``eval.hybrid_steps`` > 0 the same rows are also
sampled by hybrid inference (the policy for the first k steps, the base model after) and measured under
``eval/hybrid/``. ``docs/evaluation.md`` explains each number.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from flowgrove.config.load import Config
from flowgrove.evaluation.diversity import group_diversity, mmd2_unbiased
from flowgrove.grpo.advantages import aggregate_rewards
from flowgrove.grpo.losses import transition_kl
from flowgrove.policies.base import Conditioning
from flowgrove.rewards import build_reward
from flowgrove.rewards.base import RewardFn
from flowgrove.samplers.family import step_family
from flowgrove.samplers.steps import noise_g, sde_type_of
from flowgrove.training import method
from flowgrove.training.heldout import HeldOut, Share, eval_rows, gather_rows, sample_share, score_share
from flowgrove.training.rollout import batched_velocity
from flowgrove.training.parts import TrainingState
from flowgrove.training.setup import rewards_for

HYBRID = "eval/hybrid/"  # prefix of the hybrid-inference numbers (eval.hybrid_steps > 0)


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
    hybrid_images: Tensor | None = None  # [N, 3, H, W] with eval.hybrid_steps > 0


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


def snapshot(state: TrainingState) -> list[Tensor]:
    """CPU copies of a trainer's trainable weights (taken before training or loading a checkpoint: the base)."""
    source = state.reference if state.reference is not None else state.params
    return [p.detach().to("cpu", copy=True) for p in source]


def _rows(held: HeldOut) -> Tensor:
    return eval_rows(len(held.prompts), held.cfg.eval.samples_per_prompt)  # [N]


def eval_share(held: HeldOut, *, keep_states: bool = False, then: AbstractContextManager | None = None,
               switch_at: int = 0) -> Share:
    """This rank's share of the evaluation samples (as ``GRPOTrainer.evaluate``: same rows, seed and grid) with
    the policy's current weights; ``then``/``switch_at`` as :func:`flowgrove.training.heldout.sample_share`."""
    cfg = held.cfg
    return sample_share(held.policy, held.cond, _rows(held), method.base_sigmas(cfg, cfg.eval.num_steps),
                        cfg.eval.seed, chunk_size=cfg.sampler.chunk_size, decode_batch=cfg.rollout.decode_batch,
                        keep_states=keep_states, then=then, switch_at=switch_at)


@torch.no_grad()
def kl_to_base(held: HeldOut, share: Share, base: list[Tensor]) -> float:
    """Mean over samples of the summed KL of the policy's SDE transitions (the training sampler's ``g``) to the
    base model's, at the states of the policy's evaluation rollout ``share`` (kept states; every rank its own rows,
    the totals gathered); a step that draws no noise (CPS's or DDIM's last step onto the data) has no KL and is left
    out. NaN when the sampler's noise level is 0."""
    s, policy = held.cfg.sampler, held.policy
    if s.noise_level <= 0:
        return math.nan
    rows, family = _rows(held), step_family(policy)
    device = next(policy.module.parameters()).device
    cond_rows = held.cond.to(device).select(rows[share.positions].to(device))
    total = torch.zeros(share.positions.shape[0], dtype=torch.float64, device=device)  # [M]
    with held.swapped(base):
        for i, (x, v) in enumerate(zip(share.states, share.velocities)):
            sigma, sigma_next = float(share.sigmas[i]), float(share.sigmas[i + 1])
            x = x.to(device)
            v_base = batched_velocity(policy, x, x.new_full((x.shape[0],), sigma), cond_rows, s.chunk_size)
            g, kind = noise_g(s.noise, s.noise_level, sigma, sigma_next), sde_type_of(s.noise)
            zeros = torch.zeros_like(x)
            mine = family.sde(x, v.to(device), sigma, sigma_next, g, sde_type=kind, noise=zeros)
            theirs = family.sde(x, v_base, sigma, sigma_next, g, sde_type=kind, noise=zeros)
            if bool((mine.std > 0).all()):  # the step's std is the same for every row
                total += transition_kl(mine.mean, theirs.mean, mine.std).double()  # [M]
    return gather_rows(total, rows.shape[0]).mean().item()


def features(images: Tensor, *rewards: Mapping[str, RewardFn]) -> Tensor:
    """Diversity features [N, D]: the image embedding of the first reward with ``embed(images)`` (judges are passed
    first), else the pixels."""
    for judge in (fn for group in rewards for fn in group.values()):
        embed = getattr(judge, "embed", None)
        if callable(embed):
            return embed(images).float().flatten(1).cpu()
    return images.float().flatten(1).cpu()


def _gathered_features(held: HeldOut, judges: Mapping[str, RewardFn], share: Share) -> Tensor:
    local = features(share.images, judges, held.rewards).to(share.images.device)  # [M, D]
    return gather_rows(local, _rows(held).shape[0]).cpu()  # [N, D]


def _diversity(feats: Tensor, group: int) -> float:
    return group_diversity(feats, group).item() if group >= 2 else math.nan


@torch.no_grad()
def build_setup(held: HeldOut, base: list[Tensor] | None) -> EvalSetup:
    """Judges, and the base model's evaluation samples (``base`` weights, no EMA) as the diversity baseline."""
    e = held.cfg.eval
    if e.hybrid_steps > e.num_steps:
        raise ValueError(f"eval.hybrid_steps={e.hybrid_steps} is more than eval.num_steps={e.num_steps}: hybrid "
                         f"inference runs the policy for the first k steps; e.g. eval.hybrid_steps={e.num_steps // 2}")
    setup = EvalSetup(rewards_for(held.policy, build_judges(held.cfg, held.device)), base)
    if base is not None:
        with held.swapped(base):
            share = eval_share(held)
        setup.base_features = _gathered_features(held, setup.judges, share)
        setup.base_diversity = _diversity(setup.base_features, held.cfg.eval.samples_per_prompt)
    return setup


def _measure(held: HeldOut, setup: EvalSetup, share: Share, prefix: str) -> dict[str, float]:
    """Rewards, judges, diversity and MMD^2 to the base of one evaluation share, keys ``<prefix>reward`` etc."""
    rows = _rows(held)
    n, prompts = rows.shape[0], [held.prompts[i] for i in rows[share.positions].tolist()]
    raw = score_share(held.rewards, share.images, prompts, n)  # [K, N]
    out = {f"{prefix}reward": aggregate_rewards(raw, held.weights).mean().item()}
    out.update({f"{prefix}reward/{name}": raw[k].mean().item() for k, name in enumerate(held.rewards)})
    judged = score_share(setup.judges, share.images, prompts, n)  # [J, N]
    out.update({f"{prefix}judge/{name}": judged[k].mean().item() for k, name in enumerate(setup.judges)})
    feats = _gathered_features(held, setup.judges, share)  # [N, D]
    out[f"{prefix}diversity"] = _diversity(feats, held.cfg.eval.samples_per_prompt)
    if setup.base_features is not None:
        out[f"{prefix}diversity_ratio"] = out[f"{prefix}diversity"] / setup.base_diversity
        out[f"{prefix}mmd2"] = mmd2_unbiased(feats, setup.base_features).item() if n >= 2 else math.nan
    return out


@torch.no_grad()
def evaluate_step(held: HeldOut, setup: EvalSetup, step: int) -> EvalRecord:
    """One periodic evaluation (after training step ``step``) of the current policy (EMA weights when enabled), split across ranks; with
    ``eval.hybrid_steps`` > 0 also hybrid inference (the policy for the first k steps, the base model after),
    measured under ``eval/hybrid/``. Every rank returns the same record."""
    k, n = held.cfg.eval.hybrid_steps, _rows(held).shape[0]
    hybrid = None
    with held.swapped(held.ema) if held.ema is not None else nullcontext():
        share = eval_share(held, keep_states=setup.base is not None)
        kl = kl_to_base(held, share, setup.base) if setup.base is not None else math.nan
        if k > 0 and setup.base is not None:
            hybrid = eval_share(held, then=held.swapped(setup.base), switch_at=k)
    metrics = {"step": step, **_measure(held, setup, share, "eval/")}
    if setup.base_features is not None:
        metrics["eval/kl"] = kl
    record = EvalRecord(metrics, gather_rows(share.images, n).cpu())
    if hybrid is not None:
        metrics.update(_measure(held, setup, hybrid, HYBRID))
        record.hybrid_images = gather_rows(hybrid.images, n).cpu()
    return record


@torch.no_grad()
def hybrid_images(held: HeldOut, base: list[Tensor], cond: Conditioning, rows: Tensor, sigmas: Tensor, seed: int,
                  trained_steps: int) -> Tensor:
    """MixGRPO's hybrid inference: the ODE with the policy's current weights for the first ``trained_steps`` of
    the grid ``sigmas`` [S + 1], then with the ``base`` weights; noise from ``seed`` as :func:`flowgrove.training.heldout.ode_images`, split
    across ranks. Returns all images [N, 3, H, W] (videos [N, F, 3, H, W]) on every rank."""
    cfg = held.cfg
    share = sample_share(held.policy, cond, rows, sigmas, seed, chunk_size=cfg.sampler.chunk_size,
                         decode_batch=cfg.rollout.decode_batch, then=held.swapped(base),
                         switch_at=trained_steps)
    return gather_rows(share.images, rows.shape[0])
