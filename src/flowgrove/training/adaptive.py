"""Adaptive trees (``tree.adaptive_calls``): the split choice a tree rollout asks for at each split step. The rule is
``flowgrove.grpo.tree_rules.adaptive_split_counts`` (how many nodes per tree split, from the call budget) and
``flowgrove.grpo.tree.best_and_worst`` (which ones); see docs/trees.md.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowgrove.config.schema import Config
from flowgrove.grpo import tree
from flowgrove.training import method
from flowgrove.training.rollout import SplitChoice


def split_choice(cfg: Config, score: Callable[[Tensor, Tensor], Tensor], n_trees: int, num_steps: int) -> SplitChoice:
    """At a split step the budget's count of each tree's nodes splits into ``tree.branching`` children, the best and
    worst by ``score`` (x0 predictions [N, ...], conditioning rows [N] -> [N], the weighted trained reward), and the
    others get one child; where every node splits nothing is scored.

    Args:
        cfg: the run's config (``tree.adaptive_calls``, ``tree.branching``, the split steps).
        score: the score of each node's x0 prediction.
        n_trees: trees in the rollout (this rank's), stored tree-major.
        num_steps: the plan's steps.

    Returns:
        (step, x0 predictions [N, ...], rows [N]) -> children per node [N] (long).
    """
    counts, k = method.adaptive_splits(cfg, num_steps), cfg.tree.branching

    def choose(step: int, x0_pred: Tensor, rows: Tensor) -> Tensor:
        n_split = counts[step]
        if n_split * n_trees >= x0_pred.shape[0]:
            return torch.full((x0_pred.shape[0],), k, dtype=torch.long)
        split = tree.best_and_worst(score(x0_pred, rows), n_trees, n_split)  # [N]
        return torch.where(split, k, 1)

    return choose
