"""Which denoising transitions are trained: boolean masks ``[B, T]`` over samples and steps.

Random choices use a caller-provided ``torch.Generator`` seeded identically on every rank, so all
ranks pick the same steps (unlike MixGRPO's unseeded window, spec bug M4).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_shape(num_samples: int, num_steps: int) -> None:
    if num_samples < 1 or num_steps < 1:
        raise ValueError(f"num_samples and num_steps must be >= 1, got {num_samples} and {num_steps}.")


def random_fraction_mask(
    num_samples: int, num_steps: int, fraction: float, exclude_last: bool, generator: torch.Generator
) -> Tensor:
    """Per sample, a random ``fraction`` of the eligible steps (DanceGRPO ``train_one_step``).

    Each sample draws an independent permutation of the eligible steps (all ``T``, or the first
    ``T - 1`` when ``exclude_last``: the reward image is the x0 prediction at the last step, or DanceGRPO's SD
    recipe, which trains ``timesteps[:-1]``) and keeps the first ``max(int(eligible * fraction), 1)``. FLUX: T=16,
    0.6 -> 9 of 15; SD: T=50, 1.0 -> all 49 of 49.

    Args:
        num_samples: Number of samples ``B``.
        num_steps: Number of denoising steps ``T``.
        fraction: Fraction in (0, 1] of the eligible steps to train.
        exclude_last: Never select step ``T - 1``.
        generator: CPU generator, seeded identically on every rank.

    Returns:
        Bool mask ``[B, T]`` on the CPU.
    """
    _check_shape(num_samples, num_steps)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}; DanceGRPO uses 0.6.")
    eligible = num_steps - 1 if exclude_last else num_steps
    if eligible < 1:
        raise ValueError("exclude_last=True needs num_steps >= 2; set exclude_last=False for a 1-step sampler.")
    keep = max(int(eligible * fraction), 1)
    order = torch.rand(num_samples, eligible, generator=generator).argsort(dim=1)  # [B, eligible] permutations
    mask = torch.zeros(num_samples, num_steps, dtype=torch.bool)  # [B, T]
    mask.scatter_(1, order[:, :keep], True)
    return mask


def first_k_mask(num_samples: int, num_steps: int, k: int) -> Tensor:
    """The first ``k`` steps in order for every sample (Flow-GRPO: ``k = int(T * 0.99) = 9`` of 10).

    Args:
        num_samples: Number of samples ``B``.
        num_steps: Number of denoising steps ``T``.
        k: Number of leading steps to train, in [1, T].

    Returns:
        Bool mask ``[B, T]`` on the CPU.
    """
    _check_shape(num_samples, num_steps)
    if not 1 <= k <= num_steps:
        raise ValueError(f"k must be in [1, num_steps={num_steps}], got {k}.")
    mask = torch.zeros(num_samples, num_steps, dtype=torch.bool)  # [B, T]
    mask[:, :k] = True
    return mask


def _epoch_permutation(num_items: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # [num_items]


def epoch_draws(num_items: int, step: int, per_step: int, seed: int) -> Tensor:
    """The items of training step ``step`` when every step takes ``per_step`` of ``num_items`` items.

    Each epoch is a permutation of ``range(num_items)`` drawn from a generator seeded by (``seed``, epoch) and cut
    into ``num_items // per_step`` steps (the last ``num_items % per_step`` items of the permutation sit that epoch
    out, as in a sampler with ``drop_last``), so no item repeats within a step or an epoch, epochs are
    reshuffled, every rank draws the same items, and the draw is a pure function of the step (a resumed run
    continues without stored state). With ``per_step > num_items`` the permutations are concatenated instead.

    Returns:
        Item indices ``[per_step]`` (long).
    """
    if num_items < 1 or step < 0 or per_step < 1:
        raise ValueError(f"need num_items >= 1, step >= 0, per_step >= 1; got {num_items}, {step}, {per_step}.")
    if per_step <= num_items:
        steps_per_epoch = num_items // per_step
        epoch, slot = divmod(step, steps_per_epoch)
        return _epoch_permutation(num_items, seed, epoch)[slot * per_step:(slot + 1) * per_step]  # [per_step]
    positions = torch.arange(step * per_step, (step + 1) * per_step)  # [per_step] in the concatenated sequence
    epochs = positions // num_items
    perms = {int(e): _epoch_permutation(num_items, seed, int(e)) for e in epochs.unique()}
    return torch.stack([perms[int(e)][int(p)] for e, p in zip(epochs, positions % num_items)])  # [per_step]


def live_order(live: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """The rows of one update in training order: the live rows shuffled, then dead rows up to ``size`` rows.

    A live row enters the loss; a dead one (``train.drop_zero_advantage``: its advantage is 0, Flow-GRPO's
    filter) does not. Data-parallel ranks train equally many rows, so that their forward passes stay in step;
    ``size`` is the most live rows any rank holds, and a rank with fewer pads with its dead rows, whose forward
    passes enter no loss. With every row live and ``size = E`` this is ``randperm(E)``.

    Args:
        live: Bool ``[E]``, True where the row enters the loss.
        size: Rows to return, ``live.sum() <= size <= E``.
        generator: CPU generator of the shuffle.

    Returns:
        Row indices ``[size]`` (long): the live ones first.
    """
    kept, dead = live.nonzero().flatten(), (~live).nonzero().flatten()  # [E_live], [E - E_live]
    if not kept.numel() <= size <= live.numel():
        raise ValueError(f"size={size} must lie between the {kept.numel()} live rows and all {live.numel()} rows.")
    shuffled = kept[torch.randperm(kept.numel(), generator=generator)]  # [E_live]
    return torch.cat([shuffled, dead[:size - kept.numel()]])  # [size]


def accumulation_groups(order: Tensor, accumulate: str, accumulate_size: int, n_samples: int,
                        world: int) -> tuple[Tensor, ...]:
    """Cut a rank's training order ``[E]`` into accumulation groups, one optimizer step each.

    ``samples``: ``ceil(n_samples * world / accumulate_size)`` groups of near-equal size (at most E), so
    ``accumulate_size`` counts the global batch and every world size takes the same steps; ``transitions``:
    groups of ``accumulate_size // world`` rows of this rank.

    Returns:
        The groups, each a slice of ``order``.
    """
    if accumulate == "samples":
        return order.tensor_split(max(1, min(order.numel(), -(-n_samples * world // accumulate_size))))
    return order.split(max(1, accumulate_size // world))
