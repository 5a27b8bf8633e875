"""GRPO policy loss (PPO-clip on per-transition log-probs, or its GRPO-Guard, TempFlow-GRPO and Flow-DPPO forms) and
the transition KL penalty. The forward-process objectives (DiffusionNFT, AWM) are in :mod:`flowgrove.grpo.matching`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowgrove.samplers.steps import _bcast


class PolicyLoss(NamedTuple):
    """The policy loss and its diagnostics over ``E`` trained transitions."""

    loss: Tensor  # [] (weighted) mean over E, differentiable
    clip_fraction: Tensor  # [] fraction outside the trust region: |ratio - 1| > clip_range (clip), masked (dppo)
    approx_kl: Tensor  # [] 0.5 * mean((log_prob - old_log_prob)^2)
    ratio: Tensor  # [E] importance ratios as the loss used them (re-centred under ratio_norm), detached

    def logs(self) -> dict[str, float]:
        """The loss and diagnostics as numbers (``ratio_dev``: max |ratio - 1|)."""
        return {"loss": self.loss.item(), "clip_fraction": self.clip_fraction.item(),
                "approx_kl": self.approx_kl.item(), "ratio_dev": (self.ratio - 1).abs().max().item()}


@dataclass(frozen=True)
class TrustRegion:
    """How far an update may move a transition's policy: PPO's ratio clip, or Flow-DPPO's bound on the exact KL."""

    kind: str = "clip"  # a key of TRUST_REGIONS
    clip_range: float = 1e-3  # clip: PPO eps of the ratio
    kl_bound: float = 1e-5  # dppo: bound on the exact per-dimension KL to the rollout policy's step

    def __post_init__(self) -> None:
        if self.kind not in TRUST_REGIONS:
            raise ValueError(f"unknown trust region {self.kind!r}; use one of {sorted(TRUST_REGIONS)}.")
        bound, name = (self.clip_range, "clip_range") if self.kind == "clip" else (self.kl_bound, "kl_bound")
        if bound <= 0:
            raise ValueError(f"{name} must be > 0 for the {self.kind!r} trust region, got {bound}.")


def _plain_log_ratio(log_prob: Tensor, old_log_prob: Tensor, drift_kl: Tensor | None, std: Tensor | None) -> Tensor:
    return log_prob - old_log_prob  # [E]


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, drift_kl: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's RatioNorm ``std * (log_prob - old_log_prob + drift_kl)`` (Wang et al. 2025, eq. 8; flow_grpo's
    ``train_sd3_GRPO_Guard.py``), per transition, so a micro-batch may mix steps.

    With ``x' = mu_old + std * z`` and ``dmu = mu - mu_old``: ``log_prob - old_log_prob = mean(z * dmu) / std -
    drift_kl``, where ``drift_kl = mean(dmu^2) / (2 std^2)`` (per-dimension means, as the log-probs). The plain
    log-ratio is biased below 0 by ``drift_kl`` and scaled by ``1 / std``; the re-centred one is ``mean(z * dmu)``:
    mean 0 over the noise (ratio centred on 1) at every step, on one scale.

    Args:
        log_prob: Log-probs under the current policy ``[E]`` (per-dimension mean).
        old_log_prob: Log-probs stored at rollout ``[E]``.
        drift_kl: Exact KL of the current to the rollout policy's step ``[E]`` (:func:`transition_kl`, mean).
        std: Transition std each sample was drawn with ``[E]``.

    Returns:
        The re-centred log-ratio ``[E]``.
    """
    return std * (log_prob - old_log_prob + drift_kl)  # [E]


# train.ratio_norm -> (log_prob, old_log_prob, drift_kl, std) [E] each -> the log-ratio the loss uses [E].
RATIO_NORMS: dict[str, Callable[[Tensor, Tensor, Tensor | None, Tensor | None], Tensor]] = {
    "none": _plain_log_ratio,  # log pi - log pi_old (Flow-GRPO, DanceGRPO)
    "grpo_guard": guard_log_ratio,  # RatioNorm (GRPO-Guard)
}


def _uniform_weights(sigma: Tensor, sigma_next: Tensor, std: Tensor, mean_std: float) -> Tensor:
    return torch.ones_like(std)  # [E]


def guard_step_weights(sigma: Tensor, sigma_next: Tensor, std: Tensor, mean_std: float) -> Tensor:
    """GRPO-Guard's gradient reweighting ``1 / dt = 1 / (sigma - sigma_next)`` ``[E]`` (Wang et al. 2025, eq. 12;
    flow_grpo divides a step's loss by ``sqrt_dt^2``): after RatioNorm a step's gradient scales with ``dt``."""
    return 1 / (sigma - sigma_next)  # [E]


def tempflow_step_weights(sigma: Tensor, sigma_next: Tensor, std: Tensor, mean_std: float) -> Tensor:
    """TempFlow-GRPO's noise-aware weights ``std / mean_std`` ``[E]`` (He et al. 2025): each step's transition std
    (its exploration noise, split scale excluded) over the mean std of the steps a run trains, so the weights average
    1 there (the reference's constant 2.25 is 1 / that mean for Flow-GRPO's SD3 grid: 10 steps, a = 0.7, 9 trained)."""
    return std / mean_std  # [E]


# train.step_weight -> (sigma, sigma_next, transition std [E] each, mean std of the trainable steps) -> weights [E].
STEP_WEIGHTS: dict[str, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "none": _uniform_weights,
    "grpo_guard": guard_step_weights,  # 1 / dt (GRPO-Guard)
    "tempflow": tempflow_step_weights,  # std / mean std (TempFlow-GRPO)
}


def step_weights(kind: str, sigma: Tensor, sigma_next: Tensor, std: Tensor, mean_std: float) -> Tensor:
    """Per-transition weights ``[E]`` of the policy loss (see ``STEP_WEIGHTS``); ``std`` is each step's transition std
    without the split scale and ``mean_std`` its mean over the trainable steps (``training.method.mean_trained_std``)."""
    if kind not in STEP_WEIGHTS:
        raise ValueError(f"unknown step weight {kind!r}; use one of {sorted(STEP_WEIGHTS)}.")
    return STEP_WEIGHTS[kind](sigma, sigma_next, std, mean_std)


def _clip_region(ratio: Tensor, adv: Tensor, drift_kl: Tensor | None, region: TrustRegion) -> tuple[Tensor, Tensor]:
    eps = region.clip_range
    unclipped = -adv * ratio  # [E]
    clipped = -adv * ratio.clamp(1 - eps, 1 + eps)  # [E]
    return torch.maximum(unclipped, clipped), (ratio - 1).abs() > eps


def dppo_region(ratio: Tensor, adv: Tensor, drift_kl: Tensor, region: TrustRegion) -> tuple[Tensor, Tensor]:
    """Flow-DPPO's trust region: ``-A * r`` without a clip, except a transition whose exact KL to the rollout policy's
    step reaches ``region.kl_bound`` while the update pushes it further (``r > 1, A > 0`` or ``r < 1, A < 0``): that one
    contributes 0 and no gradient; a corrective update (the ratio moving back towards 1) stays (Flow-DPPO eq. 18;
    UniRL ``_flowdppo_kl_adv_loss``).

    Args:
        ratio: Importance ratios ``[E]`` (with grad).
        adv: Clamped advantages ``[E]``.
        drift_kl: Exact per-dimension KL of the current to the rollout policy's step ``[E]``.
        region: The bound ``kl_bound``.

    Returns:
        (per-transition loss ``[E]``, masked ``[E]`` bool).
    """
    outward = ((ratio > 1) & (adv > 0)) | ((ratio < 1) & (adv < 0))  # [E]
    masked = (drift_kl.detach() >= region.kl_bound) & outward  # [E]
    return torch.where(masked, torch.zeros_like(ratio), -adv * ratio), masked  # where: no inf * 0 in the gradient


# train.trust_region -> (ratio, clamped advantages, drift KL [E] each, region) -> (loss [E], outside [E] bool).
TRUST_REGIONS: dict[str, Callable[[Tensor, Tensor, Tensor | None, TrustRegion], tuple[Tensor, Tensor]]] = {
    "clip": _clip_region,  # PPO: max(-A r, -A clip(r, 1 - eps, 1 + eps))
    "dppo": dppo_region,  # Flow-DPPO: -A r, masked where the exact KL exceeds the bound outward
}


def policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, adv_clip_max: float, region: TrustRegion, *,
    ratio_norm: str = "none", drift_kl: Tensor | None = None, std: Tensor | None = None,
    weights: Tensor | None = None,
) -> PolicyLoss:
    """``mean(w * l(r, A))``: the log-ratio of ``ratio_norm`` (``RATIO_NORMS``), ``r`` its exp, ``A`` clamped to
    ``[-adv_clip_max, adv_clip_max]``, ``l`` the per-transition loss of the trust region (``TRUST_REGIONS``) and ``w``
    the step weights (default 1). The three choices compose: GRPO-Guard is ``grpo_guard`` ratios with ``1 / dt``
    weights under the clip, TempFlow-GRPO ``std`` weights, Flow-DPPO the ``dppo`` region.

    Args:
        log_prob: Log-probs under the current policy ``[E]`` (with grad).
        old_log_prob: Log-probs stored at rollout ``[E]``.
        advantages: Advantages ``[E]``.
        adv_clip_max: Positive bound on ``|A|``.
        region: The trust region.
        ratio_norm: A key of ``RATIO_NORMS``.
        drift_kl: Exact per-dimension KL of the current to the rollout policy's step ``[E]`` (RatioNorm keeps its
            gradient); needed by ``grpo_guard`` ratios and the ``dppo`` region.
        std: Transition std ``[E]`` (``grpo_guard`` ratios).
        weights: Step weights ``[E]``, or None for 1.

    Returns:
        ``PolicyLoss``; only ``loss`` carries gradient.
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}.")
    if ratio_norm not in RATIO_NORMS:
        raise ValueError(f"unknown ratio_norm {ratio_norm!r}; use one of {sorted(RATIO_NORMS)}.")
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            "log_prob, old_log_prob and advantages must share the shape [E], got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}."
        )
    if drift_kl is None and (ratio_norm != "none" or region.kind == "dppo"):
        raise ValueError(f"ratio_norm={ratio_norm!r} with the {region.kind!r} trust region needs drift_kl [E].")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    lp, old = log_prob.to(dtype), old_log_prob.to(dtype)  # [E]
    log_ratio = RATIO_NORMS[ratio_norm](lp, old, drift_kl, std)  # [E]
    ratio = torch.exp(log_ratio)  # [E]
    adv = advantages.to(dtype).clamp(-adv_clip_max, adv_clip_max)  # [E]
    per, outside = TRUST_REGIONS[region.kind](ratio, adv, drift_kl, region)  # [E], [E]
    loss = (per if weights is None else weights.to(dtype) * per).mean()  # []
    with torch.no_grad():
        clip_fraction = outside.to(dtype).mean()  # []
        approx_kl = 0.5 * ((lp - old) ** 2).mean()  # []
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl, ratio=ratio.detach())


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
    return policy_loss(log_prob, old_log_prob, advantages, adv_clip_max, TrustRegion("clip", clip_range))


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


def loss_weight(scale: str, live: int, group_live: int, world: int, accumulate_size: float, per_root: int) -> float:
    """Factor of a micro-batch's mean loss over its ``live`` transitions (those that enter the loss), such that the
    accumulation group's loss, after the data-parallel mean over ``world`` ranks, is ``mean``: the sum over its
    transitions divided by ``group_live``, the group's transitions that enter the loss on all ranks (with
    ``train.drop_zero_advantage`` the rows it leaves out are counted by neither); ``reference``: BranchGRPO's sum
    over the group's transitions / (G * N-bar), with ``accumulate_size`` = G / world (this rank's share of
    ``train.accumulate_size``) and N-bar the stored transitions per chain or tree (DanceGRPO's 1/(G*K))."""
    return live * world / group_live if scale == "mean" else live / (accumulate_size * per_root)


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
