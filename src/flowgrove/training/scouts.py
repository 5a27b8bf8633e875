"""Scout rollouts (``rollout.scouts``): a cheap pass ranks many candidate initial noises per group and only the best
and worst are rolled out in full for training.

Sol-RL's idea in flowgrove's terms (as ``branchgrpo-widpru`` keeps a tree's best and worst leaves, here before the
rollout): every chain draws ``S = rollout.scouts`` candidate noises (the global batch's, sliced per rank, so the draw
does not depend on the world size); each candidate is integrated by ``rollout.scout_steps`` Euler ODE steps on the
sampler's schedule, decoded and scored with the trained rewards (their weighted total); within each group (this rank's
chains of one prompt) the ``k // 2`` best and ``k - k // 2`` worst of its ``S * k`` candidates start the group's ``k``
chains. The full rollout's advantages then come from samples whose rewards spread more. The scout pass costs
``S * scout_steps`` model calls and ``S`` reward calls per trained chain, counted in the step's rollout seconds.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowgrove.config.load import Config
from flowgrove.grpo.tree import best_and_worst
from flowgrove.parallel.rank_share import RankShare
from flowgrove.policies.base import Conditioning, FlowPolicy
from flowgrove.training import method
from flowgrove.training.heldout import integrate_ode

Score = Callable[[Tensor, Tensor], Tensor]  # (latents [N, ...], cond rows [N]) -> weighted reward totals [N]


def pick_extremes(totals: Tensor, roots: Tensor, scouts: int) -> Tensor:
    """Which candidates start the chains: per run of equal ``roots`` (a group's candidates, ``scouts`` per chain),
    the ``k // 2`` best and ``k - k // 2`` worst by ``totals``, ``k`` the run's chains.

    Args:
        totals: [N * scouts] the candidates' scout rewards, candidate ``j`` of chain ``c`` at ``c * scouts + j``.
        roots: [N * scouts] each candidate's conditioning row (its chain's); a group's chains are contiguous.
        scouts: candidates per chain.

    Returns:
        Bool [N * scouts], True for the ``N`` chosen candidates (in candidate order).
    """
    keep = torch.zeros(totals.numel(), dtype=torch.bool)
    _, counts = torch.unique_consecutive(roots.cpu(), return_counts=True)
    start = 0
    for count in counts.tolist():  # [start, start + count): one group's candidates on this rank
        keep[start:start + count] = best_and_worst(totals[start:start + count], 1, count // scouts)
        start += count
    return keep


def scout_calls_per_sample(cfg: Config) -> int:
    """Model calls of the scout pass per trained chain: ``S * scout_steps`` (0 without scouts)."""
    return cfg.rollout.scouts * cfg.rollout.scout_steps if cfg.rollout.scouts > 1 else 0


def candidate_noise(cfg: Config, latent_shape: tuple[int, ...], share: RankShare, generator: torch.Generator) -> Tensor:
    """``rollout.scouts`` candidate noises per chain of this rank [N0_r * S, ...]: the global batch's draw, sliced."""
    s = cfg.rollout.scouts
    x = torch.randn((share.total * s, *latent_shape), generator=generator)
    return x[share.start * s:(share.start + share.size) * s].contiguous()


@torch.no_grad()
def scout_noise(cfg: Config, policy: FlowPolicy, cond: Conditioning, roots: Tensor, share: RankShare,
                generator: torch.Generator, score: Score) -> Tensor:
    """The initial noise [N0_r, ...] of this rank's chains, chosen by the scout pass (module docstring).

    Args:
        roots: [N0_r] each chain's row of ``cond`` (a group's chains contiguous).
        generator: the step's noise stream (the candidates are its first draw, as the initial noise is without scouts).
        score: weighted reward totals of latents (decoded by the caller).
    """
    s = cfg.rollout.scouts
    x0 = candidate_noise(cfg, policy.latent_shape, share, generator).to(roots.device)  # [N0_r * S, ...]
    rows = roots.repeat_interleave(s)  # [N0_r * S]
    sigmas = method.base_sigmas(cfg, cfg.rollout.scout_steps)
    x = integrate_ode(policy, x0, sigmas, cond.select(rows), cfg.sampler.chunk_size)  # [N0_r * S, ...]
    keep = pick_extremes(score(x, rows), rows, s).to(x0.device)  # [N0_r * S]
    return x0[keep]  # [N0_r, ...]: each group's chosen candidates, in order
