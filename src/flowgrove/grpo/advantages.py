"""Group-relative advantages for GRPO (rewards ``[B]``, ``group_ids [B]``: images of one prompt share an id)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Normalizer = Callable[[Tensor, Tensor], Tensor]  # (rewards [B], group_ids [B]) -> advantages [B]


def _check(rewards: Tensor, group_ids: Tensor) -> Tensor:
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}."
        )
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def _group_mean_var(rewards: Tensor, group_ids: Tensor, ddof: int) -> tuple[Tensor, Tensor]:
    """Per-sample mean ``[B]`` and variance ``[B]`` of its group (variance 0 for groups of <= ddof).

    The mean is taken relative to the group's largest reward, so a group whose rewards all tie has exactly that
    reward as its mean: ``r - mean`` is exactly 0 there. (``sum / count`` rounds: twelve rewards of 0.1 in float32
    leave a residue of ~1e-8, which ``eps = 1e-8`` would turn into advantages of about +-0.6.)
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [B] group index 0..G-1
    num_groups = int(inverse.max()) + 1
    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards)
    )  # [G]
    top = torch.zeros_like(counts).scatter_reduce_(0, inverse, rewards, "amax", include_self=False)[inverse]  # [B]
    offsets = torch.zeros_like(counts).index_add_(0, inverse, rewards - top)  # [G] sums of r - top (<= 0)
    mean = top + (offsets / counts)[inverse]  # [B]
    sq = torch.zeros_like(counts).index_add_(0, inverse, (rewards - mean) ** 2)  # [G]
    dof = counts - ddof  # [G]
    var = torch.where(dof > 0, sq / dof.clamp(min=1), torch.zeros_like(sq))  # [G]
    return mean, var[inverse]


def group_zscore(rewards: Tensor, group_ids: Tensor, ddof: int = 1, eps: float = 1e-8) -> Tensor:
    """Per-group z-score ``(r - mean_g) / (std_g + eps)`` (DanceGRPO / MixGRPO ``train_one_step``).

    DanceGRPO uses the unbiased std (``ddof=1``) and ``eps=1e-8``. A group of one sample gets 0.

    Args:
        rewards: Rewards ``[B]``.
        group_ids: Group (prompt) id per sample ``[B]``, any integers.
        ddof: Delta degrees of freedom of the std.
        eps: Added to the std.

    Returns:
        Advantages ``[B]`` (float32 or wider).
    """
    rewards = _check(rewards, group_ids)
    mean, var = _group_mean_var(rewards, group_ids, ddof)  # [B], [B]
    return (rewards - mean) / (var.sqrt() + eps)  # [B]


def group_mean_global_std(rewards: Tensor, group_ids: Tensor, ddof: int = 0, eps: float = 1e-4) -> Tensor:
    """Per-prompt mean, std over all rewards: ``(r - mean_g) / (std_all + eps)`` (Flow-GRPO ``global_std``).

    Args:
        rewards: Rewards ``[B]`` of the whole epoch (gathered from all ranks).
        group_ids: Prompt id per sample ``[B]``.
        ddof: Delta degrees of freedom of the std (Flow-GRPO: 0, ``np.std``).
        eps: Added to the std.

    Returns:
        Advantages ``[B]`` (float32 or wider).
    """
    rewards = _check(rewards, group_ids)
    mean, _ = _group_mean_var(rewards, group_ids, ddof)  # [B]
    std = rewards.std(correction=ddof) if rewards.numel() > ddof else rewards.new_zeros(())
    return (rewards - mean) / (std + eps)  # [B]


def _weights(weights: Sequence[float] | Tensor, rewards: Tensor) -> Tensor:
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if rewards.ndim != 2 or weights.shape != (rewards.shape[0],):
        raise ValueError(
            f"rewards must be [K, B] with one weight per reward, got {tuple(rewards.shape)} "
            f"and {tuple(weights.shape)} weights."
        )
    return weights  # [K]


def aggregate_advantages(
    rewards: Tensor,
    weights: Sequence[float] | Tensor,
    group_ids: Tensor,
    normalize: Normalizer = group_zscore,
) -> Tensor:
    """Normalize each reward separately, then take the weighted sum (MixGRPO ``advantage_aggr``).

    Args:
        rewards: Raw rewards ``[K, B]``, one row per reward model.
        weights: One weight per reward ``[K]``.
        group_ids: Prompt id per sample ``[B]``.
        normalize: ``(rewards [B], group_ids [B]) -> advantages [B]``, e.g. ``group_zscore``.

    Returns:
        Advantages ``[B]``.
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    weights = _weights(weights, rewards)  # [K]
    per_reward = torch.stack([normalize(row, group_ids) for row in rewards])  # [K, B]
    return (weights[:, None] * per_reward).sum(dim=0)  # [B]


def aggregate_rewards(rewards: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """Weighted sum of raw rewards (Flow-GRPO ``multi_score``; MixGRPO ``reward_aggr``).

    Args:
        rewards: Raw rewards ``[K, B]``.
        weights: One weight per reward ``[K]``.

    Returns:
        Total reward ``[B]``.
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    return (_weights(weights, rewards)[:, None] * rewards).sum(dim=0)  # [B]


def clamp_advantages(adv: Tensor, max_abs: float) -> Tensor:
    """Clamp to ``[-max_abs, max_abs]`` (``adv_clip_max = 5`` in DanceGRPO and Flow-GRPO).

    Args:
        adv: Advantages, any shape.
        max_abs: Positive bound.

    Returns:
        Clamped advantages, same shape.
    """
    if max_abs <= 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}; the reference repos use 5.0.")
    return adv.clamp(-max_abs, max_abs)


def tree_zscores(values: Tensor, n_trees: int, ddof: int = 1, eps: float = 1e-8, min_std: float = 1e-6) -> Tensor:
    """Z-score ``values`` [N] (tree-major, ``N / n_trees`` per tree) within each tree.

    ``(v - mean) / (std + eps)`` per tree; a tree with at most ``max(1, ddof)`` values or with ``std < min_std`` gets
    zeros, never NaN.

    Returns:
        [N], shaped like ``values``.
    """
    if ddof < 0:
        raise ValueError(f"ddof must be >= 0, got {ddof}")
    per_tree = values.reshape(n_trees, -1)  # [n_trees, m], storage is tree-major
    if per_tree.shape[1] <= max(1, ddof):
        return torch.zeros_like(values)
    std = per_tree.std(dim=1, correction=ddof, keepdim=True)  # [n_trees, 1]
    centered = per_tree - per_tree.mean(dim=1, keepdim=True)  # [n_trees, m]
    adv = torch.where(std >= min_std, centered / (std + eps), torch.zeros_like(centered))
    return adv.reshape(-1)  # [N]
