"""GRPO policy loss (PPO-clip on per-transition log-probs) and the transition KL penalty; the forward-process
objectives (DiffusionNFT, Advantage Weighted Matching) on final samples noised at drawn times, without log-probs."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowgrove.samplers.steps import _bcast


class PolicyLoss(NamedTuple):
    """PPO-clip loss and its diagnostics over ``E`` trained transitions."""

    loss: Tensor  # [] mean over E, differentiable
    clip_fraction: Tensor  # [] fraction of transitions with |ratio - 1| > clip_range
    approx_kl: Tensor  # [] 0.5 * mean((log_prob - old_log_prob)^2)
    ratio: Tensor  # [E] importance ratios, detached

    def logs(self) -> dict[str, float]:
        """The loss and diagnostics as numbers (``ratio_dev``: max |ratio - 1|)."""
        return {"loss": self.loss.item(), "clip_fraction": self.clip_fraction.item(),
                "approx_kl": self.approx_kl.item(), "ratio_dev": (self.ratio - 1).abs().max().item()}


def ppo_clip_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, adv_clip_max: float
) -> PolicyLoss:
    """``mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))`` (PPO, Schulman et al. 2017; DanceGRPO, Flow-GRPO).

    ``r = exp(log_prob - old_log_prob)`` and ``A`` is clamped to ``[-adv_clip_max, adv_clip_max]``.
    With per-dimension-mean log-probs the reference repos use ``clip_range`` 1e-4 ... 1e-3.

    Args:
        log_prob: Log-probs under the current policy ``[E]`` (with grad).
        old_log_prob: Log-probs stored at rollout ``[E]``.
        advantages: Advantages ``[E]``.
        clip_range: PPO ``eps`` > 0.
        adv_clip_max: Positive bound on ``|A|``.

    Returns:
        ``PolicyLoss``; only ``loss`` carries gradient.
    """
    if clip_range <= 0 or adv_clip_max <= 0:
        raise ValueError(f"clip_range and adv_clip_max must be > 0, got {clip_range} and {adv_clip_max}.")
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            "log_prob, old_log_prob and advantages must share the shape [E], got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}."
        )
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    log_ratio = log_prob.to(dtype) - old_log_prob.to(dtype)  # [E]
    ratio = torch.exp(log_ratio)  # [E]
    adv = advantages.to(dtype).clamp(-adv_clip_max, adv_clip_max)  # [E]
    unclipped = -adv * ratio  # [E]
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)  # [E]
    loss = torch.maximum(unclipped, clipped).mean()  # []
    with torch.no_grad():
        clip_fraction = ((ratio - 1).abs() > clip_range).to(dtype).mean()  # []
        approx_kl = 0.5 * (log_ratio**2).mean()  # []
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl, ratio=ratio.detach())


def transition_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float, reduce: str = "mean") -> Tensor:
    """Exact KL(N(mean, std^2) || N(ref_mean, std^2)) = ``||mean - ref_mean||^2 / (2 std^2)`` (Flow-GRPO KL term).

    ``std`` is the TRANSITION std ``g * sqrt(sigma - sigma_next)``. Flow-GRPO divides by ``g^2`` only
    (spec bug F1), which is the true KL times ``delta_sigma``; this function is the true KL.

    Args:
        mean: Transition means of the policy ``[E, ...]``.
        ref_mean: Transition means of the reference policy ``[E, ...]``.
        std: Transition std, scalar or ``[E]``, > 0.
        reduce: ``"mean"`` (per-dimension, like the log-probs) or ``"sum"`` over non-batch dims.

    Returns:
        KL per transition ``[E]``.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}.")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    diff = mean.to(dtype) - ref_mean.to(dtype)  # [E, ...]
    kl = diff**2 / (2 * _bcast(std, diff) ** 2)  # [E, ...]
    if kl.ndim == 1:
        return kl  # [E]
    dims = tuple(range(1, kl.ndim))
    return kl.mean(dim=dims) if reduce == "mean" else kl.sum(dim=dims)  # [E]


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


def loss_weight(scale: str, rows: int, chunk: int, accumulate_size: int, per_root: int) -> float:
    """Factor of a micro-batch's mean loss. ``mean``: its share of the accumulation group (the group's loss is the
    mean over its transitions). ``reference``: BranchGRPO's sum over the group's transitions / (G * N-bar), with
    G = ``train.accumulate_size`` and N-bar the stored transitions per chain or tree (DanceGRPO's 1/(G*K))."""
    return rows / chunk if scale == "mean" else rows / (accumulate_size * per_root)


def kl_std(scale: str, transition_std: Tensor, g: Tensor) -> Tensor:
    """Std [E] in the KL term ``||dmu||^2 / 2 std^2``: the transition std the samples were drawn with (exact KL;
    ``noise_scale * g * sqrt(dsigma)`` for flows, DDIM's sigma_t for diffusion models), or Flow-GRPO's ``g`` without
    sqrt(dsigma) (``reference``: the exact KL times dsigma, so the reference's beta transfers; flow policies)."""
    return g if scale == "reference" else transition_std


def _ema_every_update(decay: float, optimizer_steps: int, per_rollout: bool) -> float | None:
    return None if per_rollout else decay


def _ema_per_rollout(decay: float, optimizer_steps: int, per_rollout: bool) -> float | None:
    return decay if per_rollout else None


def _ema_flowgrpo(decay: float, optimizer_steps: int, per_rollout: bool) -> float | None:
    s = optimizer_steps
    return None if per_rollout or (s + 1) % 8 else min((1 + s) / (10 + s), decay)


# train.ema_schedule -> (decay, optimizer steps so far, called at the end of a rollout?) -> the decay to apply now.
EMA_SCHEDULES: dict[str, Callable[[float, int, bool], float | None]] = {
    "update": _ema_every_update,  # after every optimizer step
    "dancegrpo": _ema_per_rollout,  # once per rollout
    "flowgrpo": _ema_flowgrpo,  # min((1 + s) / (10 + s), decay) after optimizer step s when (s + 1) % 8 == 0
}


def ema_decay(schedule: str, decay: float, optimizer_steps: int, per_rollout: bool) -> float | None:
    """The EMA decay to apply now, or None. ``update``: ``decay`` after every optimizer step. ``dancegrpo``: once
    per rollout. ``flowgrpo``: min((1 + s) / (10 + s), decay) after optimizer step s when (s + 1) % 8 == 0 (once,
    not once per batch as the reference's bug F4 does)."""
    return EMA_SCHEDULES[schedule](decay, optimizer_steps, per_rollout)
