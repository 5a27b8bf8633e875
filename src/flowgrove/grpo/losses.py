"""GRPO policy loss (PPO-clip on per-transition log-probs) and the transition KL penalty."""

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
