"""Forward-process objectives (DiffusionNFT, Advantage Weighted Matching): the rollout's final samples, noised at
drawn grid times, with the rollout policy's output there; and the loss terms one micro-batch reads from them.

Whatever sampler produced the final samples (SDE chains, windows, ODE or DPM-Solver++ tails), training sees only
the clean latents the rewards scored, so no step's log-prob is needed. The step family says what "noised" and
"the output pretraining regresses" mean (rectified flow: ``(1 - sigma) x0 + sigma noise`` and ``noise - x0``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowgrove.config.schema import Config
from flowgrove.grpo.matching import FORWARD_LOSSES, MatchingSettings, MatchingTerms, output_kl
from flowgrove.grpo.plans import StepPlan
from flowgrove.parallel.rank_share import RankShare
from flowgrove.policies.base import Conditioning, FlowPolicy
from flowgrove.samplers.family import StepFamily, step_family
from flowgrove.training import method
from flowgrove.training.rollout import NoiseSource, Rollout, batched_velocity


class ForwardSamples(NamedTuple):
    """E final samples noised at a grid time each (several rows per sample): what a forward objective trains on."""

    x0: Tensor  # [E, C, H, W] the clean final latent the rewards scored (float32)
    noise: Tensor  # [E, C, H, W] the standard normal noise it is noised with
    sigma: Tensor  # [E] the grid time it is noised to
    old_output: Tensor  # [E, C, H, W] the rollout policy's output at (x_sigma, sigma), float32, no grad
    cond_index: Tensor  # [E] row of the conditioning batch
    sample: Tensor  # [E] its final sample (leaf), whose advantage it trains with

    def select(self, index: Tensor) -> ForwardSamples:
        return ForwardSamples(*(t[index] for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.x0.shape[0]


@torch.no_grad()
def forward_samples(policy: FlowPolicy, cond: Conditioning, leaves: Tensor, leaf_cond_index: Tensor, mask: Tensor,
                    times: Tensor, source: NoiseSource, chunk_size: int = 0) -> ForwardSamples:
    """The rows of the final samples ``leaves`` [N, C, H, W] at the grid times ``mask`` [N, T] picks from ``times`` [T],
    sample-major; the noise is this rank's rows of the global batch's draw (``source``), and the rollout policy's
    output is taken now, before any weight of the step changes (DiffusionNFT's ``old`` policy, AWM's old log-prob).

    Args:
        policy: the velocity model (its weights at rollout time).
        cond: conditioning batch; ``leaf_cond_index`` [N] picks each sample's row.
        leaves: the final samples the rewards scored.
        mask: which grid times each sample is trained at (:func:`flowgrove.training.method.forward_mask`).
        times: the grid's times sigma_0..sigma_{T-1}.
        source: the step's noise generator and this rank's share of the global batch.
        chunk_size: largest batch of one model call (0 = everything at once).

    Returns:
        :class:`ForwardSamples`, E = ``mask.sum()`` rows.
    """
    sample, step = mask.nonzero(as_tuple=True)  # [E] each, sample-major
    sample = sample.to(leaves.device)
    x0 = leaves[sample].float()  # [E, C, H, W]
    noise = source.randn(x0.shape)  # [E, C, H, W] this rank's rows of the global draw (None: one rank)
    if noise is None:
        noise = torch.randn(x0.shape, generator=source.generator, device=source.generator.device)
    noise = noise.to(x0.device)
    sigma = times.to(x0)[step.to(x0.device)]  # [E]
    rows = leaf_cond_index[sample]  # [E]
    x = step_family(policy).add_noise(x0, noise, sigma)  # [E, C, H, W]
    old = batched_velocity(policy, x, sigma, cond.select(rows), chunk_size).float()  # [E, C, H, W]
    return ForwardSamples(x0, noise, sigma, old, rows, sample)


def matching_terms(family: StepFamily, batch: ForwardSamples, x: Tensor, output: Tensor,
                   advantages: Tensor) -> MatchingTerms:
    """What the forward losses read of ``batch`` noised to ``x`` [E, ...], given the policy's ``output`` there [E, ...]
    (with grad) and the rows' ``advantages`` [E], in the family's data predictions and pretraining target."""
    return MatchingTerms(
        output=output, old_output=batch.old_output,
        x0_pred=family.x0(x, output, batch.sigma), old_x0_pred=family.x0(x, batch.old_output, batch.sigma),
        x0=batch.x0, target=family.target(batch.x0, batch.noise, batch.sigma), sigma=batch.sigma, advantages=advantages,
    )


def step_rows(cfg: Config, policy: FlowPolicy, cond: Conditioning, ro: Rollout, share: RankShare,
              shared: torch.Generator, noise: torch.Generator) -> ForwardSamples:
    """One training step's rows of this rank's final samples: the grid times of :func:`method.forward_mask` from the
    step's shared generator and the noise from its noise generator, both drawn for the global batch and sliced."""
    mask = method.forward_mask(cfg, share.total, shared)[share.start:share.start + share.size]  # [N_r, T]
    return forward_samples(policy, cond, ro.leaves, ro.leaf_cond_index, mask, method.base_sigmas(cfg)[:-1],
                           NoiseSource(noise, share.parts, share.part), cfg.train.micro_batch)


def forward_loss(cfg: Config, policy: FlowPolicy, batch: ForwardSamples, advantages: Tensor, cond: Conditioning,
                 engine_forward: Callable[[Callable[[], Tensor]], Tensor],
                 reference: AbstractContextManager | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss of ``train.objective`` on the rows ``batch`` (advantages [E]), plus ``train.kl_beta`` times the mean
    squared output difference to the reference policy, whose weights ``reference`` swaps in (the references' KL);
    and its numbers for the metrics. ``engine_forward`` runs the training forward (DDP sees it)."""
    t, family = cfg.train, step_family(policy)
    x, rows = family.add_noise(batch.x0, batch.noise, batch.sigma), cond.select(batch.cond_index)  # [E, C, H, W]
    ref = None
    if reference is not None:  # before the policy forward: swapping weights after it would corrupt autograd's tensors
        with torch.no_grad(), reference:
            ref = policy.velocity(x, batch.sigma, rows).float()  # [E, C, H, W]
    output = engine_forward(lambda: policy.velocity(x, batch.sigma, rows)).float()  # [E, C, H, W]
    settings = MatchingSettings(cfg.advantage.clip, t.nft_beta, t.awm_power, t.clip_range)
    out = FORWARD_LOSSES[t.objective](matching_terms(family, batch, x, output, advantages), settings)
    loss, logs = out.loss, out.logs()
    if ref is not None:
        kl = output_kl(output, ref).mean()
        loss = loss + t.kl_beta * kl
        logs["kl"] = kl.item()
    return loss, logs


def anchor_rows(cfg: Config, policy: FlowPolicy, cond: Conditioning, ro: Rollout, plan: StepPlan, source: NoiseSource,
                reference: AbstractContextManager) -> ForwardSamples | None:
    """``train.tail_anchor``'s rows: each of this rank's final samples noised to one untrained step's noise level of
    this iteration's plan (:func:`method.anchor_mask`, drawn for the global batch from ``source``'s generator and
    sliced), with the initial policy's output there (``old_output``; ``reference`` swaps its weights in). None when
    the anchor is off."""
    n = ro.leaves.shape[0]
    mask = method.anchor_mask(cfg, plan, n * source.world, source.generator)
    if mask is None:
        return None
    mask = mask[source.rank * n:(source.rank + 1) * n]  # [N_L, S] this rank's leaves
    with reference:
        return forward_samples(policy, cond, ro.leaves, ro.leaf_cond_index, mask, plan.sigmas[:-1], source,
                               cfg.train.micro_batch)


def anchor_shares(anchor: ForwardSamples | None, groups: int) -> list[ForwardSamples | None]:
    """``anchor``'s rows in ``groups`` near-equal consecutive parts, one per accumulation group (None: none)."""
    if anchor is None:
        return [None] * groups
    return [anchor.select(rows) if rows.numel() else None for rows in torch.arange(len(anchor)).tensor_split(groups)]


def anchor_backward(cfg: Config, policy: FlowPolicy, batch: ForwardSamples, cond: Conditioning,
                    engine_forward: Callable[[Callable[[], Tensor]], Tensor]) -> dict[str, float]:
    """Backward of ``train.tail_anchor`` times the mean squared difference between the policy's output and the
    initial policy's at the rows ``batch`` (:func:`anchor_rows`); returns the unweighted mean for the metrics."""
    x, rows = step_family(policy).add_noise(batch.x0, batch.noise, batch.sigma), cond.select(batch.cond_index)
    output = engine_forward(lambda: policy.velocity(x, batch.sigma, rows)).float()  # [E, C, H, W]
    anchor = output_kl(output, batch.old_output).mean()
    (cfg.train.tail_anchor * anchor).backward()
    return {"tail_anchor": anchor.item()}
