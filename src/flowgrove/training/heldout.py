"""Held-out sampling split across ranks: fixed prompts and seeds, deterministic ODE samples, rewards.

Every rank samples an equal share of the rows (the row list padded to a multiple of the world size with copies of
the last row), so every rank makes the same number of model calls with the same batch shapes (FSDP2 runs
collectives inside the forward). Row ``i``'s initial noise is row ``i`` of one draw for all rows from the seeded CPU
generator, so it does not depend on the world size; images, rewards and features are gathered with
:func:`flowgrove.parallel.distributed.all_gather_cat` and the padding dropped, so every rank holds what one process would.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from flowgrove.config.load import Config
from flowgrove.grpo.advantages import aggregate_rewards
from flowgrove.parallel import distributed
from flowgrove.policies.base import Conditioning, FlowPolicy
from flowgrove.rewards.base import RewardFn
from flowgrove.rewards.scoring import RewardFailure, score_rewards
from flowgrove.samplers.family import step_family
from flowgrove.training import method
from flowgrove.training.halts import halt_on_failed_eval_reward
from flowgrove.training.rollout import batched_velocity, decode_batched


@dataclass
class HeldOut:
    """The held-out side of a run, as evaluation reads it (named once, instead of a trainer's attributes): the policy
    and how to swap weights into it, the fixed test prompts and their conditioning, the trained rewards and weights."""

    cfg: Config
    policy: FlowPolicy
    prompts: list[str]  # [P] the held-out prompts
    cond: Conditioning  # [P, ...] their conditioning, encoded once
    rewards: dict[str, RewardFn]  # the trained rewards
    weights: Tensor  # [K] their weights
    device: torch.device
    ema: list[Tensor] | None  # the EMA weights evaluations use, or None
    swapped: Callable[[list[Tensor]], AbstractContextManager]  # these weights in the policy for a block


def row_share(n: int) -> Tensor:
    """Positions [M] of this rank's share of ``n`` rows, M = ceil(n / world) on every rank; positions past the end
    repeat the last row (padding, dropped by :func:`gather_rows`)."""
    world, rank = distributed.world_size_and_rank()
    per = -(-n // world)
    return torch.arange(rank * per, (rank + 1) * per).clamp(max=n - 1)  # [M]


def gather_rows(x: Tensor, n: int) -> Tensor:
    """Every rank's share [M, ...] -> the ``n`` rows [n, ...] in row order, padding dropped (identity on one process).
    ``x`` must be on the process group's device (the policy's)."""
    return distributed.all_gather_cat(x)[:n]


@dataclass
class Share:
    """This rank's share of an ODE sampling run, optionally with every state (for the KL to the base model)."""

    positions: Tensor  # [M] row positions (see row_share)
    sigmas: Tensor  # [S + 1]
    images: Tensor | None = None  # [M, 3, H, W] (videos [M, F, 3, H, W]) in [0, 1], on the policy's device
    states: list[Tensor] = field(default_factory=list)  # S x [M, *latent] (CPU): x at sigmas[i]
    velocities: list[Tensor] = field(default_factory=list)  # S x [M, *latent] (CPU): the output at states[i]


def integrate_ode(policy: FlowPolicy, x: Tensor, sigmas: Tensor, cond_rows: Conditioning, chunk_size: int,
                  keep: Share | None = None) -> Tensor:
    """Euler ODE steps of ``x`` [M, *latent] over ``sigmas`` [S + 1] (``keep``: record every state and output)."""
    family = step_family(policy)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = batched_velocity(policy, x, x.new_full((x.shape[0],), float(sigma)), cond_rows, chunk_size)
        if keep is not None:
            keep.states.append(x.cpu())
            keep.velocities.append(v.cpu())
        x = family.ode(x, v, sigma, sigma_next)  # [M, *latent]
    return x


@torch.no_grad()
def sample_share(policy: FlowPolicy, cond: Conditioning, rows: Tensor, sigmas: Tensor, seed: int, *,
                 chunk_size: int = 0, decode_batch: int = 0, keep_states: bool = False,
                 then: AbstractContextManager | None = None, switch_at: int = 0) -> Share:
    """This rank's share of the deterministic ODE samples (Euler for flows) of conditioning ``rows`` [N] over
    ``sigmas`` [S + 1]. With ``then`` (hybrid inference), the steps from ``switch_at`` on run inside that context
    (for example the base model's weights swapped in)."""
    positions = row_share(rows.shape[0])
    device = next(policy.module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((rows.shape[0], *policy.latent_shape), generator=gen)[positions].to(device)  # [M, *latent]
    cond_rows = cond.to(device).select(rows[positions].to(device))
    share = Share(positions, sigmas)
    keep = share if keep_states else None
    k = sigmas.shape[0] - 1 if then is None else max(0, min(switch_at, sigmas.shape[0] - 1))
    x = integrate_ode(policy, x, sigmas[:k + 1], cond_rows, chunk_size, keep)
    with then if then is not None else nullcontext():
        x = integrate_ode(policy, x, sigmas[k:], cond_rows, chunk_size, keep)
    share.images = decode_batched(policy, x, decode_batch)
    return share


def score_share(rewards: Mapping[str, RewardFn], images: Tensor, prompts: Sequence[str], n: int) -> Tensor:
    """Each reward of this rank's images [M, ...] with their prompts, gathered over ranks: [K, n] float32 (CPU)."""
    if not rewards:
        return torch.zeros(0, n)
    raw, failure = None, None
    try:
        raw = torch.stack([r.float().to(images.device) for r in score_rewards(rewards, images, prompts)])  # [K, M]
    except RewardFailure as err:
        failure = err
    halt_on_failed_eval_reward(failure)  # on every rank, before the gather
    return gather_rows(raw.T.contiguous(), n).T.cpu()  # [K, n]


@torch.no_grad()
def ode_images(policy: FlowPolicy, cond: Conditioning, rows: Tensor, sigmas: Tensor, seed: int,
               chunk_size: int = 0, decode_batch: int = 0) -> Tensor:
    """Deterministic ODE samples over ``sigmas`` [S + 1] for conditioning rows [N] from noise seeded by ``seed``,
    sampled split across ranks. Returns all N images [N, 3, H, W] (videos [N, F, 3, H, W]) on every rank."""
    share = sample_share(policy, cond, rows, sigmas, seed, chunk_size=chunk_size, decode_batch=decode_batch)
    return gather_rows(share.images, rows.shape[0])


class EvalResult(dict):
    """``{"reward": weighted mean, "reward/<name>": ...}`` plus ``images`` [N, 3, H, W] (videos [N, F, 3, H, W],
    CPU)."""

    images: Tensor


def eval_rows(n_prompts: int, samples_per_prompt: int) -> Tensor:
    """Conditioning rows [N] of the evaluation: each prompt ``samples_per_prompt`` times, prompt-major."""
    return torch.arange(n_prompts).repeat_interleave(samples_per_prompt)  # [N]


@torch.no_grad()
def evaluate_policy(policy: FlowPolicy, cond: Conditioning, prompts: Sequence[str], rewards: Mapping[str, RewardFn],
                    weights: Tensor, cfg: Config) -> EvalResult:
    """ODE samples for every prompt (``eval.samples_per_prompt`` each, noise from ``eval.seed``) and their rewards,
    split across ranks; every rank returns the same result."""
    e = cfg.eval
    rows = eval_rows(len(prompts), e.samples_per_prompt)  # [N]
    share = sample_share(policy, cond, rows, method.base_sigmas(cfg, e.num_steps), e.seed,
                         chunk_size=cfg.sampler.chunk_size, decode_batch=cfg.rollout.decode_batch)
    local_prompts = [prompts[i] for i in rows[share.positions].tolist()]
    raw = score_share(rewards, share.images, local_prompts, rows.shape[0])  # [K, N]
    result = EvalResult({"reward": aggregate_rewards(raw, weights).mean().item()})
    result.update({f"reward/{name}": raw[k].mean().item() for k, name in enumerate(rewards)})
    result.images = gather_rows(share.images, rows.shape[0]).cpu()  # CPU: the trainer keeps its last result
    return result
