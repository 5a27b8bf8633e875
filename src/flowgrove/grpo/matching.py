"""The forward-process objectives (``train.objective``): DiffusionNFT and Advantage Weighted Matching train on the
rollout's final samples noised at drawn times, without log-probs (the GRPO policy loss is :mod:`flowgrove.grpo.losses`)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowgrove.grpo.losses import PolicyLoss, ppo_clip_loss


class MatchingTerms(NamedTuple):
    """What a forward-process objective reads at ``E`` final samples noised to ``sigma`` (one row each), in the policy's
    own output (flows: the velocity) and its step family's data prediction."""

    output: Tensor  # [E, ...] the policy's output at the noised sample, with grad
    old_output: Tensor  # [E, ...] the rollout policy's output there (no grad)
    x0_pred: Tensor  # [E, ...] the data prediction from ``output`` (with grad)
    old_x0_pred: Tensor  # [E, ...] the data prediction from ``old_output``
    x0: Tensor  # [E, ...] the clean final samples (the ones the rewards scored)
    target: Tensor  # [E, ...] the output pretraining regresses there (flows: noise - x0)
    sigma: Tensor  # [E] the noise level of each row
    advantages: Tensor  # [E] the advantage of each row's final sample


class MatchingSettings(NamedTuple):
    """The hyperparameters of the forward-process objectives."""

    adv_clip_max: float  # advantages are clamped to +-adv_clip_max
    nft_beta: float  # DiffusionNFT's beta (> 0)
    awm_power: float  # AWM's generalised-Huber power p (> 0)
    clip_range: float  # AWM's clip range of its ratio (> 0)


def nft_loss(terms: MatchingTerms, settings: MatchingSettings) -> PolicyLoss:
    """DiffusionNFT's negative-aware fine-tuning loss (Zheng et al. 2025, NVlabs/DiffusionNFT ``train_nft_sd3.py``).

    The implicit positive and negative policies mix the current and the rollout policy's outputs,
    ``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v``; the data prediction is affine in the
    output with weights that sum to 1, so their data predictions mix the same way (``x0+``, ``x0-``, what the reference
    regresses: ``x_t - t v+``). With ``c = adv_clip_max`` and ``r = clamp(A, -c, c) / (2c) + 1/2`` in [0, 1]:
    ``loss = mean(c / beta * (r * d(x0+) + (1 - r) * d(x0-)))``, ``d(p) = mean((p - x0)^2) / max(mean|p - x0|, 1e-5)``
    per sample (the reference's adaptive weighting, the denominator without gradient). ``ratio`` is 1 and
    ``clip_fraction`` 0 (nothing is clipped); ``approx_kl`` is ``0.5 * mean((v - v_old)^2)``, the KL between unit
    Gaussians around the two outputs (the reference logs the mean square as ``old_deviate``).

    Args:
        terms: The rows (``output``, ``old_output``, ``x0_pred``, ``old_x0_pred``, ``x0``, ``advantages`` are read).
        settings: ``nft_beta`` > 0 and ``adv_clip_max`` > 0.

    Returns:
        ``PolicyLoss``; only ``loss`` carries gradient.
    """
    beta, c = settings.nft_beta, settings.adv_clip_max
    if beta <= 0 or c <= 0:
        raise ValueError(f"nft_beta and adv_clip_max must be > 0, got {beta} and {c}.")
    dtype = torch.promote_types(terms.x0_pred.dtype, torch.float32)
    x0_pred, old, x0 = terms.x0_pred.to(dtype), terms.old_x0_pred.detach().to(dtype), terms.x0.to(dtype)  # [E, ...]
    r = (terms.advantages.to(dtype).clamp(-c, c) / (2 * c) + 0.5).clamp(0, 1)  # [E] optimality probability
    positive = beta * x0_pred + (1 - beta) * old  # [E, ...]
    negative = (1 + beta) * old - beta * x0_pred  # [E, ...]
    per_sample = c / beta * (r * _adaptive_mse(positive, x0) + (1 - r) * _adaptive_mse(negative, x0))  # [E]
    with torch.no_grad():
        approx_kl = 0.5 * ((terms.output.to(dtype) - terms.old_output.to(dtype)) ** 2).mean()  # []
    ones = torch.ones_like(r)
    return PolicyLoss(loss=per_sample.mean(), clip_fraction=r.new_zeros(()), approx_kl=approx_kl, ratio=ones)


def _adaptive_mse(pred: Tensor, x0: Tensor) -> Tensor:
    """``mean((pred - x0)^2) / max(mean|pred - x0|, 1e-5)`` per sample ``[E]``, the denominator without gradient."""
    dims = tuple(range(1, pred.ndim))
    scale = (pred - x0).detach().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)  # [E, 1, ...]
    return ((pred - x0) ** 2 / scale).mean(dim=dims)  # [E]


def matching_log_prob(output: Tensor, target: Tensor, sigma: Tensor, power: float) -> Tensor:
    """AWM's log-likelihood surrogate of a noised sample ``-sigma * ((m + 1e-10)^p - 1e-10^p) / p`` ``[E]``, with
    ``m`` the per-dimension mean squared error of the output against the pretraining target (Xue et al. 2025,
    ``compute_log_prob_awm`` with the generalised-Huber weighting ``ghuber``; ``p = 1`` is ``-sigma * m``).

    Args:
        output: The policy's output ``[E, ...]``.
        target: The pretraining target ``[E, ...]`` (flows: noise - x0).
        sigma: Noise levels ``[E]``.
        power: ``p`` > 0.

    Returns:
        ``[E]``, in float32 or wider.
    """
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}; AWM uses 0.25.")
    dtype = torch.promote_types(output.dtype, torch.float32)
    error = (output.to(dtype) - target.to(dtype)) ** 2  # [E, ...]
    mse = error.mean(dim=tuple(range(1, error.ndim)))  # [E]
    return -sigma.to(dtype) * ((mse + 1e-10) ** power - 1e-10**power) / power  # [E]


def awm_loss(terms: MatchingTerms, settings: MatchingSettings) -> PolicyLoss:
    """Advantage Weighted Matching (Xue et al. 2025, scxue/advantage_weighted_matching ``train_sd3_awm.py``): PPO-clip
    on :func:`matching_log_prob` of the current against the rollout policy's output, with advantages clamped to
    ``+-adv_clip_max`` and divided by it (the reference's ``advantage_max = 1``). On-policy its gradient is
    ``-A grad log p``: the pretraining loss weighted by the advantages.

    Args:
        terms: The rows (``output``, ``old_output``, ``target``, ``sigma``, ``advantages`` are read).
        settings: ``awm_power``, ``clip_range`` and ``adv_clip_max``, each > 0.

    Returns:
        ``PolicyLoss`` of :func:`ppo_clip_loss`.
    """
    c = settings.adv_clip_max
    if c <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {c}.")
    log_prob = matching_log_prob(terms.output, terms.target, terms.sigma, settings.awm_power)  # [E]
    with torch.no_grad():
        old_log_prob = matching_log_prob(terms.old_output, terms.target, terms.sigma, settings.awm_power)  # [E]
    return ppo_clip_loss(log_prob, old_log_prob, terms.advantages.clamp(-c, c) / c, settings.clip_range, 1.0)


def output_kl(output: Tensor, ref_output: Tensor) -> Tensor:
    """The forward objectives' KL surrogate to the reference policy: ``mean((out - ref_out)^2)`` over non-batch dims
    ``[E]`` (DiffusionNFT's ``kl_div_loss``, AWM's ``kl_weight="Uniform"``)."""
    dtype = torch.promote_types(output.dtype, torch.float32)
    diff = output.to(dtype) - ref_output.to(dtype)  # [E, ...]
    return (diff**2).mean(dim=tuple(range(1, diff.ndim)))  # [E]


# train.objective -> the loss of a forward-process objective over MatchingTerms; "grpo" (PPO-clip on the stored SDE
# transitions, :func:`ppo_clip_loss`) is the one that reads log-probs instead.
FORWARD_LOSSES: dict[str, Callable[[MatchingTerms, MatchingSettings], PolicyLoss]] = {
    "nft": nft_loss,  # DiffusionNFT
    "awm": awm_loss,  # Advantage Weighted Matching
}
OBJECTIVES = ("grpo", *FORWARD_LOSSES)
