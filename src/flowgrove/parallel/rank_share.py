"""Which rows of a step's global batch each rank holds: contiguous equal blocks of roots (chains or tree roots),
a group or a tree that spans ranks, and the checks that the batch splits evenly (run before any model loads)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from flowgrove.config.schema import Config
from flowgrove.messages import ConfigError


@dataclasses.dataclass(frozen=True)
class RankShare:
    """One rank's part of a step's global batch of roots (chains, or tree roots). The batch is cut into ``parts``
    equal contiguous blocks, block ``part`` holds roots ``[start, start + size)`` of ``total``, and the single-process
    batch is the blocks one after another. Usually a block is one rank's (``span`` 1); a tree that spans ranks is
    rolled out (without gradients) by each of its ``span`` ranks, which train disjoint shares of its transitions."""

    positions: Tensor  # [P_r] positions, in the step's drawn prompt list, of the prompts this rank samples
    roots: Tensor  # [N0_r] each local root's row in ``positions``
    start: int  # the block's first global root
    size: int  # roots in the block (N0_r)
    total: int  # roots of the global batch (N0)
    parts: int  # blocks of the global batch (the world size, or the trees when a tree spans ranks)
    part: int  # this rank's block
    span: int = 1  # ranks sharing the block (the ranks of one tree)
    member: int = 0  # this rank's place among them


def roots_per_prompt(cfg: Config) -> int:
    return 1 if cfg.tree.enabled else cfg.rollout.group_size


def check_global_batch(cfg: Config, world: int) -> None:
    """The step's global batch must split into equal parts over the ranks (equal shapes: no rank waits)."""
    p, per = cfg.rollout.prompts_per_step, roots_per_prompt(cfg)
    if (p * per) % world == 0 or (cfg.tree.enabled and world % p == 0):
        return
    if cfg.tree.enabled:
        raise ConfigError(f"rollout.prompts_per_step={p} trees per step do not split evenly over {world} ranks; "
                          f"make it a multiple of {world} (a tree per rank or more) or a divisor of it (a tree spans ranks)")
    raise ConfigError(f"rollout.prompts_per_step={p} x rollout.group_size={per} = {p * per} samples per step do not "
                      f"split evenly over {world} ranks; make the product a multiple of {world}")


def rank_share(cfg: Config, world: int, rank: int) -> RankShare:
    """This rank's roots of the global batch (``rollout.prompts_per_step`` prompts x ``roots_per_prompt``): a group
    may span ranks; so may a tree, when there are fewer trees than ranks (see :func:`check_global_batch`)."""
    per = roots_per_prompt(cfg)
    total = cfg.rollout.prompts_per_step * per
    span = world // total if cfg.tree.enabled and total < world else 1
    parts, part = world // span, rank // span
    size = total // parts
    prompt_of_root = torch.arange(part * size, (part + 1) * size) // per  # [N0_r] into the drawn prompts
    positions, roots = torch.unique_consecutive(prompt_of_root, return_inverse=True)
    return RankShare(positions, roots, part * size, size, total, parts, part, span, rank % span)


def unique_blocks(x: Tensor, world: int, span: int) -> Tensor:
    """Rows gathered from every rank [world * B, ...] -> one copy per block [world / span * B, ...]: the ``span``
    ranks of a block (one tree) hold identical rows, the first of them is kept."""
    return x if span == 1 else x.view(world, -1, *x.shape[1:])[::span].reshape(-1, *x.shape[1:])


def member_rows(n: int, share: RankShare) -> Tensor:
    """This rank's rows of the ``n`` transitions a tree's ``span`` ranks all hold: equal contiguous shares."""
    if n % share.span:
        raise ValueError(f"the tree's {n} stored transitions do not split evenly over its {share.span} ranks; "
                         "use as many trees per step as ranks (rollout.prompts_per_step) or change the branching")
    size = n // share.span
    return torch.arange(share.member * size, (share.member + 1) * size)
