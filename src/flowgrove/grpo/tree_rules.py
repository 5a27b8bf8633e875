"""Rules over a tree rollout beyond BranchGRPO's: TreeGRPO's backed-up advantages (``advantage.kind=backprop``), the
table of tree advantage rules, and the call budget of adaptive trees (``tree.adaptive_calls``). Pure tensor math on
the CPU, no model calls; the forest shape, fusion and pruning are in :mod:`flowgrove.grpo.tree`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor

from flowgrove.grpo.advantages import tree_zscores
from flowgrove.grpo.tree import Forest, depthwise_advantages, fuse_rewards, parse_split_steps


def backprop_advantages(
    leaf_rewards: Tensor,
    forest: Forest,
    ddof: int = 1,
    eps: float = 1e-8,
    min_std: float = 1e-6,
    mode: str = "mean",
    edge_log_probs: tuple[Tensor, ...] | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, ...]:
    """TreeGRPO's tree advantages (Ding and Ye, arXiv 2512.08153): leaf rewards are z-scored within their tree, and
    these leaf advantages are backed up through the tree, so a node's advantage is the mean of the leaf advantages
    below it (``mode="mean"``; ``"path"`` and ``"local"`` weigh the leaves as :func:`fuse_rewards` does).

    The paper states "leaf rewards normalized to advantages, then backpropagated through the tree to each edge"; no
    code is public, so the backup as the (weighted) subtree mean is this library's reading. Unlike
    :func:`depthwise_advantages` there is one normalisation per tree, at the leaves: with ``"mean"`` a node's
    advantage is ``(subtree mean - tree mean) / leaf std``, so an edge whose subtree mean barely differs from its
    cousins' gets a small advantage instead of a unit-variance one. The edge into a node is trained with the node's
    advantage, ``advantages[d + 1]``; clamping is the caller's.

    Args:
        leaf_rewards: [n_leaves] rewards of the deepest depth.
        forest: the forest shape.
        ddof, eps, min_std: of the leaf z-score (:func:`tree_zscores`).
        mode, edge_log_probs, temperature: the backup weights (:func:`fuse_rewards`).

    Returns:
        Advantages per depth, root first (the root's is 0 in ``"mean"`` mode); the last entry is the leaf z-scores.
    """
    if leaf_rewards.shape != (forest.num_leaves,):
        raise ValueError(f"leaf_rewards must be [{forest.num_leaves}], got {tuple(leaf_rewards.shape)}")
    leaf_adv = tree_zscores(leaf_rewards, forest.n_trees, ddof, eps, min_std)  # [n_leaves]
    return fuse_rewards(leaf_adv, forest, mode, edge_log_probs, temperature)


def fused_depthwise_advantages(
    leaf_rewards: Tensor,
    forest: Forest,
    ddof: int = 1,
    eps: float = 1e-8,
    mode: str = "mean",
    edge_log_probs: tuple[Tensor, ...] | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, ...]:
    """BranchGRPO's tree advantages: :func:`fuse_rewards`, then :func:`depthwise_advantages`."""
    fused = fuse_rewards(leaf_rewards, forest, mode, edge_log_probs, temperature)
    return depthwise_advantages(fused, forest, ddof=ddof, eps=eps)


# advantage.kind of tree rollouts -> (leaf rewards [n_leaves], forest, ddof, eps, mode, edge_log_probs, temperature)
# -> advantages per depth, root first.
TREE_ADVANTAGES = {
    "depthwise": fused_depthwise_advantages,  # BranchGRPO: fused rewards z-scored per tree and depth
    "backprop": backprop_advantages,  # TreeGRPO: leaf z-scores per tree, backed up as (weighted) subtree means
}


def adaptive_split_counts(num_steps: int, split_steps: Iterable[int], branching: int, call_budget: int) -> tuple[int, ...]:
    """Nodes per tree that split at each split step so that one tree costs at most ``call_budget`` model calls.

    The same fraction ``f`` of a tree's nodes splits at every split step, ``m_s = ceil(f * n_s)`` (the root always
    splits), with ``f`` the largest multiple of 1/256 whose tree fits the budget; the other nodes go on as chains. A
    tree's calls are ``sum_d n_d`` over depths 0..T-1 (:attr:`Forest.model_calls`), and a split of ``m`` nodes at
    step ``s`` adds ``m (K - 1)`` nodes at depths ``s + 1 .. T``.

    Returns:
        ``m_s`` per split step, in ascending step order.

    Raises:
        ValueError: the budget is below the cheapest tree (one node splitting at every split step).
    """
    steps = parse_split_steps(split_steps, num_steps)

    def tree_of(fraction: float) -> tuple[tuple[int, ...], int]:
        nodes, counts, calls, depth = 1, [], 0, 0
        for step in steps:
            calls += nodes * (step + 1 - depth)  # depths depth..step
            m = max(1, math.ceil(fraction * nodes))
            counts.append(m)
            nodes, depth = nodes + m * (branching - 1), step + 1
        return tuple(counts), calls + nodes * (num_steps - depth)

    for j in range(256, 0, -1):
        counts, calls = tree_of(j / 256)
        if calls <= call_budget:
            return counts
    raise ValueError(f"a call budget of {call_budget} is below the cheapest tree with these splits "
                     f"({tree_of(0.0)[1]} calls: one node splits at each split step)")
