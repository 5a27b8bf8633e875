"""From leaf rewards to one advantage per stored transition, for chains (group statistics) and trees
(fused rewards, depth-wise z-scores, or TreeGRPO's backed-up leaf z-scores). Orchestration over the pure functions of
``advantages``, ``tree`` and ``tree_rules``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowgrove.config.load import AdvantageConfig, Config, TreeConfig
from flowgrove.grpo import advantages, tree, tree_rules
from flowgrove.parallel.rank_share import RankShare
from flowgrove.training import method
from flowgrove.training.rollout import Rollout, Transitions


def chain_normalizer(cfg: AdvantageConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """rewards [N], group ids [N] -> advantages [N] as configured."""
    if cfg.kind == "group_global_std":
        return lambda r, g: advantages.group_mean_global_std(r, g, ddof=cfg.ddof, eps=cfg.eps)
    return lambda r, g: advantages.group_zscore(r, g, ddof=cfg.ddof, eps=cfg.eps)


def chain_advantages(rewards: Tensor, weights: Tensor, group_ids: Tensor, cfg: AdvantageConfig) -> Tensor:
    """rewards [K, N] (one row per reward model) -> advantages [N] of the final samples."""
    normalize = chain_normalizer(cfg)  # the weights are used as given: a negative weight penalises its reward
    if cfg.aggregate == "advantage":
        return advantages.aggregate_advantages(rewards, weights, group_ids, normalize)
    return normalize(advantages.aggregate_rewards(rewards, weights), group_ids)


def block_chain_advantages(rewards: Tensor, weights: Tensor, cfg: Config, share: RankShare) -> Tensor:
    """Advantages [N_r] of one rank's block of chains, from the rewards [K, N_total] of every block's final samples
    (groups of ``rollout.group_size`` consecutive samples)."""
    group = torch.arange(rewards.shape[1]) // cfg.rollout.group_size  # [N_total]
    return chain_advantages(rewards, weights, group, cfg.advantage).chunk(share.parts)[share.part]


def tree_advantages(
    rewards: Tensor, weights: Tensor, forest: tree.Forest, edge_log_probs: tuple[Tensor, ...],
    cfg: AdvantageConfig, tree_cfg: TreeConfig,
) -> tuple[Tensor, ...]:
    """rewards [K, N_leaves] -> advantages per depth (root first): depth-wise z-scores of fused rewards
    (``advantage.kind=depthwise``, BranchGRPO) or leaf z-scores backed up the tree (``backprop``, TreeGRPO)."""

    def one(leaf_rewards: Tensor) -> tuple[Tensor, ...]:
        return tree_rules.TREE_ADVANTAGES[cfg.kind](leaf_rewards, forest, ddof=cfg.ddof, eps=cfg.eps, mode=tree_cfg.fusion,
                                              edge_log_probs=edge_log_probs, temperature=tree_cfg.temperature)

    if cfg.aggregate == "advantage":
        per_reward = [one(row) for row in rewards]
        return tuple(sum(wk * adv[d] for wk, adv in zip(weights, per_reward)) for d in range(len(per_reward[0])))
    return one(advantages.aggregate_rewards(rewards, weights))


def edge_values(per_depth: tuple[Tensor, ...], depth: Tensor, node: Tensor) -> Tensor:
    """Pick per-node values [N_d] of each edge's child (depth, node) -> [E]."""
    sizes = torch.tensor([0] + [v.shape[0] for v in per_depth], device=depth.device)
    offsets = sizes.cumsum(0)[:-1]  # [D]
    return torch.cat(per_depth)[offsets[depth] + node]  # [E]


def chain_edge_advantages(sample_advantages: Tensor, rollout: Rollout) -> Tensor:
    """In a chain the child node index is the chain index: every edge gets its sample's advantage. [E]"""
    return sample_advantages[rollout.transitions.node]


def edge_advantages(cfg: Config, weights: Tensor, gathered: Tensor, ro: Rollout, forest: tree.Forest | None,
                    share: RankShare, gather: Callable[[Tensor, RankShare], Tensor]) -> Tensor:
    """Advantages [E] (on the policy's device) of the stored transitions, from the rewards [K, N_total] of every
    block's leaves (``share``: this rank's block; ``gather``: per-rank rows -> every block's rows). The collectives run
    on the device; the credit math on these few numbers runs on the CPU, where the forest is: advantages are computed
    once, each rank keeps its own rows."""
    tr = ro.transitions
    mine = lambda values: values.chunk(share.parts)[share.part]  # noqa: E731  (this block's rows)
    if forest is not None:
        fans = tuple(gather(f, share) for f in ro.fan_out) if ro.fan_out is not None else None
        forest = method.forest(cfg, forest.n_trees * share.parts, forest.num_steps, fans)  # every block's trees
        log_probs = tuple(gather(lp, share) for lp in ro.edge_log_probs)
        per_depth = tree_advantages(gathered, weights, forest, log_probs, cfg.advantage, cfg.tree)
        return edge_values(tuple(mine(a) for a in per_depth), tr.depth.cpu(), tr.node.cpu()).to(tr.x.device)
    sample_adv = block_chain_advantages(gathered, weights, cfg, share)  # [N_r]
    return chain_edge_advantages(sample_adv.to(tr.x.device), ro)


def pruning_keep(cfg: Config, iteration: int, tr: Transitions, total: Tensor, forest: tree.Forest | None) -> Tensor:
    """Indices of the stored transitions ``tr`` that enter the backward pass at step ``iteration`` (BranchGRPO
    pruning); ``total`` [N_L] is the weighted reward of each leaf (width pruning keeps the best and worst)."""
    all_rows = torch.arange(len(tr), device=tr.depth.device)
    t = cfg.tree
    if forest is None or not tree.pruning_active(iteration, cfg.train.steps, t.pruning_fraction):
        return all_rows
    masks = []
    if t.depth_pruning:
        stop = t.depth_stop if t.depth_stop >= 0 else max(forest.split_steps)
        depths = tree.depth_pruned_depths(set(t.depth_pruning), iteration, t.depth_slide_interval or None, stop)
        masks.append(tree.depth_prune_mask(forest, depths))
    if t.width_keep:
        masks.append(tree.width_prune_mask(forest, total, t.width_keep))
    if not masks:
        return all_rows
    keep_edges = edge_values(tuple(m.float() for m in tree.combine_masks(*masks)), tr.depth.cpu() - 1, tr.node.cpu())
    return keep_edges.bool().nonzero().flatten().to(tr.depth.device)
