"""Tree rollouts as parent-index tensors (BranchGRPO): shape, reward fusion, advantages, pruning.

A forest holds ``n_trees`` trees over ``T = num_steps`` denoising steps. Nodes at depth ``d`` hold
the latent at ``sigma_d``; the root (depth 0) is the initial noise and the edge from depth ``d`` to
``d + 1`` is step ``d``. At a split step every node gets ``branching`` children, otherwise one.
Nodes of one depth across all trees are stored contiguously, tree-major, with siblings adjacent,
so a whole depth goes through the model in one call. Edge tensors are indexed like ``parents``:
entry ``d`` has one value per node at depth ``d + 1`` (the edge into that node). Index tensors and
masks live on the CPU; pure tensor math, no model calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowgrove.grpo.advantages import tree_zscores

FUSION_MODES = ("mean", "path", "local")


def split_steps_evenly(num_steps: int, rounds: int) -> tuple[int, ...]:
    """Split steps ``i * floor(T / R)`` for ``i < R``, e.g. 0, 5, 10, 15 (BranchGRPO, arXiv 2509.06040)."""
    if not 0 <= rounds <= num_steps:
        raise ValueError(f"rounds must be in [0, num_steps={num_steps}], got {rounds}")
    return tuple(i * (num_steps // rounds) for i in range(rounds))


def parse_split_steps(points: str | Iterable[int], num_steps: int) -> tuple[int, ...]:
    """Sorted split steps from ``"0,3,6,9"`` or integers in [0, T - 1] (BranchGRPO, arXiv 2509.06040).

    Unlike the reference, which clamps silently, out-of-range and duplicate steps are errors.
    """
    if isinstance(points, str):
        try:
            points = [int(p) for p in points.split(",") if p.strip()]
        except ValueError as err:
            raise ValueError(f"split steps must look like '0,3,6,9', got {points!r}") from err
    steps = list(points)
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
            raise ValueError(f"split steps must be integers in [0, {num_steps - 1}], got {step!r}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"split steps must be distinct, got {steps}; list each step once")
    return tuple(sorted(steps))


@dataclass(frozen=True)
class Forest:
    """Shape of a BranchGRPO forest with parent indices per depth (BranchGRPO, arXiv 2509.06040).

    Attributes:
        num_steps: denoising steps T; depths run 0..T.
        split_steps: steps at which every node branches, ascending (validated and sorted).
        branching: children per node at a split step (K).
        n_trees: number of trees (one per prompt), stored tree-major within each depth.
        fan_out: optional children per node, entry d a LongTensor [N_d] (>= 1; an adaptive tree, where a split step
            splits only some nodes); every tree must keep the same number of nodes per depth. None: every node
            splits into ``branching`` at a split step.
        nodes_per_depth: ``N_d`` over all trees, length T + 1.
        parents: ``parents[d]`` is a LongTensor [N_{d+1}] of indices into depth d, length T.
        tree_of: ``tree_of[d]`` is a LongTensor [N_d], the tree of each node, length T + 1.
    """

    num_steps: int
    split_steps: tuple[int, ...]
    branching: int = 2
    n_trees: int = 1
    fan_out: tuple[Tensor, ...] | None = field(default=None, compare=False, repr=False)
    nodes_per_depth: tuple[int, ...] = field(init=False, compare=False)
    parents: tuple[Tensor, ...] = field(init=False, compare=False, repr=False)
    tree_of: tuple[Tensor, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.branching < 2:
            raise ValueError(f"branching must be >= 2, got {self.branching}; for chains use split_steps=()")
        if self.n_trees < 1:
            raise ValueError(f"n_trees must be >= 1, got {self.n_trees}")
        object.__setattr__(self, "split_steps", parse_split_steps(self.split_steps, self.num_steps))
        if self.fan_out is not None and len(self.fan_out) != self.num_steps:
            raise ValueError(f"fan_out needs {self.num_steps} tensors (one per step), got {len(self.fan_out)}")
        counts, parents = [self.n_trees], []
        for step in range(self.num_steps):
            fan_out = self.branching if step in self.split_steps else 1
            if self.fan_out is not None:
                fan_out = self.fan_out[step].cpu()  # [N_d]
                if fan_out.shape != (counts[-1],) or bool((fan_out < 1).any()):
                    raise ValueError(f"fan_out[{step}] must be [{counts[-1]}] counts >= 1, got {fan_out.tolist()}")
            parents.append(torch.arange(counts[-1]).repeat_interleave(fan_out))  # [N_{d+1}]
            counts.append(parents[-1].numel())
        tree_of = [torch.arange(self.n_trees)]  # [N_d] per depth: the tree of each node
        for parent in parents:
            tree_of.append(tree_of[-1][parent])
            per_tree = torch.bincount(tree_of[-1], minlength=self.n_trees)  # [n_trees]
            if bool((per_tree != per_tree[0]).any()):
                raise ValueError(f"every tree needs the same number of nodes per depth, got {per_tree.tolist()}")
        tree_of = tuple(tree_of)
        object.__setattr__(self, "nodes_per_depth", tuple(counts))
        object.__setattr__(self, "parents", tuple(parents))
        object.__setattr__(self, "tree_of", tree_of)

    def is_split_step(self, step: int) -> bool:
        """Whether the nodes at depth ``step`` branch into ``branching`` children."""
        return step in self.split_steps

    @property
    def num_leaves(self) -> int:
        """Leaves over all trees."""
        return self.nodes_per_depth[-1]

    @property
    def model_calls(self) -> int:
        """Velocity evaluations for the rollout: one per node above the leaves."""
        return sum(self.nodes_per_depth[:-1])

    @property
    def num_edges(self) -> int:
        """Transitions (trainable edges): one per non-root node."""
        return sum(self.nodes_per_depth[1:])

    @property
    def nfe_per_leaf(self) -> float:
        """Model calls per final sample, the paper's NFE per image (203 / 16 for the script)."""
        return self.model_calls / self.num_leaves


def build_forest(
    num_steps: int, split_steps: str | Iterable[int], branching: int = 2, n_trees: int = 1
) -> Forest:
    """Build a forest from split steps given as ``"0,3,6,9"`` or integers (BranchGRPO, arXiv 2509.06040)."""
    return Forest(num_steps, parse_split_steps(split_steps, num_steps), branching, n_trees)


def leaf_paths(forest: Forest) -> Tensor:
    """Node index at every depth on the root-to-leaf path of each leaf.

    Returns:
        LongTensor [n_leaves, T + 1]; column d indexes depth d, the last is ``arange(n_leaves)``.
    """
    columns = [torch.arange(forest.num_leaves)]  # [n_leaves]
    for parent in reversed(forest.parents):
        columns.insert(0, parent[columns[0]])  # [n_leaves]
    return torch.stack(columns, dim=1)  # [n_leaves, T + 1]


def _segment_softmax(scores: Tensor, segment: Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
    """Softmax within segments: (weights [N], per-segment logsumexp [n_segments])."""
    init = scores.new_full((n_segments,), -math.inf)
    seg_max = init.scatter_reduce(0, segment, scores, "amax")  # [S]
    shifted = torch.exp(scores - seg_max[segment])  # [N]
    seg_sum = scores.new_zeros(n_segments).index_add(0, segment, shifted)  # [S]
    return shifted / seg_sum[segment], seg_max + torch.log(seg_sum)


def fuse_rewards(
    leaf_rewards: Tensor,
    forest: Forest,
    mode: str = "mean",
    edge_log_probs: tuple[Tensor, ...] | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, ...]:
    """Back leaf rewards up to every node (BranchGRPO, arXiv 2509.06040).

    Modes:
        ``"mean"``: a node's reward is the mean of its leaves' rewards (the reference default).
        ``"path"``: a node's leaves are weighted by the softmax of their path log-probs over
            ``temperature`` (the README's path-probability weighting). The shared prefix cancels,
            so it runs bottom-up with ``M_n = logsumexp_c(lp_c / temperature + M_c)``, ``M_leaf = 0``.
        ``"local"``: the reference's ``--tree_prob_weighted`` (bug B10), per parent
            ``sum_c softmax_c(lp_c / temperature) * reward_c``: a product of local softmaxes.

    Args:
        leaf_rewards: [n_leaves] rewards of the deepest depth.
        forest: the forest shape.
        mode: one of ``"mean"``, ``"path"``, ``"local"``.
        edge_log_probs: needed by ``"path"`` and ``"local"``; entry d is [N_{d+1}], the log-prob
            of the edge into each node at depth d + 1 (0 for deterministic ODE edges).
        temperature: softmax temperature, > 0.

    Returns:
        Node rewards per depth, root first; the last entry is ``leaf_rewards``.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    if leaf_rewards.shape != (forest.num_leaves,):
        raise ValueError(f"leaf_rewards must be [{forest.num_leaves}], got {tuple(leaf_rewards.shape)}")
    if mode != "mean" and (edge_log_probs is None or len(edge_log_probs) != forest.num_steps):
        raise ValueError(f"mode {mode!r} needs edge_log_probs, {forest.num_steps} tensors (one per step)")
    if mode != "mean" and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    levels = [leaf_rewards]
    counts = torch.ones_like(leaf_rewards)  # leaves below each node ("mean")
    log_mass = torch.zeros_like(leaf_rewards)  # M of each node ("path")
    for depth in reversed(range(forest.num_steps)):
        parent = forest.parents[depth].to(leaf_rewards.device)  # [N_{d+1}]
        zeros = leaf_rewards.new_zeros(forest.nodes_per_depth[depth])  # [N_d]
        if mode == "mean":
            sums = zeros.index_add(0, parent, levels[0] * counts)  # [N_d]
            counts = zeros.index_add(0, parent, counts)  # [N_d]
            levels.insert(0, sums / counts)
            continue
        log_prob = edge_log_probs[depth].to(leaf_rewards)  # [N_{d+1}]
        if log_prob.shape != parent.shape:
            got = tuple(log_prob.shape)
            raise ValueError(f"edge_log_probs[{depth}] must be [{parent.numel()}], got {got}")
        scores = log_prob / temperature + (log_mass if mode == "path" else 0.0)  # [N_{d+1}]
        weights, log_mass = _segment_softmax(scores, parent, zeros.numel())
        levels.insert(0, zeros.index_add(0, parent, weights * levels[0]))  # [N_d]
    return tuple(levels)


def depthwise_advantages(
    node_rewards: tuple[Tensor, ...],
    forest: Forest,
    ddof: int = 1,
    eps: float = 1e-8,
    min_std: float = 1e-6,
) -> tuple[Tensor, ...]:
    """Z-score node rewards per tree and per depth (BranchGRPO, arXiv 2509.06040).

    ``A = (R - mean) / (std + eps)`` over one tree's nodes at one depth. A depth with one node per
    tree (always depth 0) or with ``std < min_std`` gets zeros, never NaN. The edge from depth d to
    d + 1 is trained with the child's advantage, ``advantages[d + 1]``; clamping is the caller's.

    Args:
        node_rewards: rewards per depth, root first, entry d of shape [N_d] (``fuse_rewards``).
        forest: the forest shape.
        ddof: delta degrees of freedom of the std (1 in the reference).
        eps: added to the std.
        min_std: below this std the advantages of that tree and depth are zero.

    Returns:
        Advantages per depth, shaped like ``node_rewards``.
    """
    if len(node_rewards) != forest.num_steps + 1:
        raise ValueError(f"node_rewards needs {forest.num_steps + 1} entries, got {len(node_rewards)}")
    for depth, rewards in enumerate(node_rewards):
        if rewards.shape != (forest.nodes_per_depth[depth],):
            raise ValueError(f"node_rewards[{depth}] must be [{forest.nodes_per_depth[depth]}]")
    return tuple(tree_zscores(rewards, forest.n_trees, ddof, eps, min_std) for rewards in node_rewards)


def best_and_worst(scores: Tensor, n_trees: int, count: int) -> Tensor:
    """Per tree the ``count // 2`` best and ``count - count // 2`` worst entries by ``scores`` (ties: the lower index
    ranks lower). Width pruning keeps these leaves; an adaptive tree splits these nodes: a node whose x0 prediction
    already scores at either end of its tree is where its children's rewards, and so the advantages, spread most.

    Args:
        scores: [N] one score per entry (tree-major, ``N / n_trees`` per tree).
        n_trees: number of trees.
        count: entries per tree, ``0 <= count <= N / n_trees``.

    Returns:
        Bool [N], True for the chosen entries.
    """
    per_tree = scores.numel() // n_trees
    if not 0 <= count <= per_tree:
        raise ValueError(f"count must be in [0, {per_tree}] (entries per tree), got {count}")
    order = torch.argsort(scores.cpu().reshape(n_trees, per_tree), dim=1, stable=True)  # [n_trees, m] worst first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_tree).expand_as(order))
    n_best = count // 2
    return ((rank < count - n_best) | (rank >= per_tree - n_best)).reshape(-1)  # [N]


def pruning_active(iteration: int, total_iterations: int, active_fraction: float) -> bool:
    """Pruning applies while ``iteration <= int(total * fraction)`` (BranchGRPO, arXiv 2509.06040)."""
    return iteration <= int(total_iterations * active_fraction)


def depth_pruned_depths(
    depths: Iterable[int],
    iteration: int,
    slide_interval: int | None = None,
    stop_depth: int | None = None,
) -> frozenset[int]:
    """Child depths whose edges skip the backward pass (BranchGRPO, arXiv 2509.06040).

    With sliding, the set moves shallower by
    ``min(iteration // slide_interval, max(0, min(depths) - stop_depth))``: one depth every
    ``slide_interval`` iterations until its shallowest depth reaches ``stop_depth``.

    Args:
        depths: child depths to prune, each >= 1.
        iteration: current training iteration, >= 0.
        slide_interval: iterations per one-depth shift; None disables sliding.
        stop_depth: shallowest depth the set may slide to. The reference default is
            ``max(forest.split_steps)``; None here means 1, the shallowest child depth.

    Returns:
        The pruned child depths at this iteration.
    """
    base = frozenset(depths)
    if any(d < 1 for d in base):
        raise ValueError(f"pruned depths are child depths and must be >= 1, got {sorted(base)}")
    if slide_interval is None or not base:
        return base
    if slide_interval < 1:
        raise ValueError(f"slide_interval must be >= 1 or None, got {slide_interval}")
    stop = 1 if stop_depth is None else stop_depth
    shift = min(iteration // slide_interval, max(0, min(base) - stop))
    return frozenset(d - shift for d in base)


def depth_prune_mask(forest: Forest, pruned_depths: Iterable[int]) -> tuple[Tensor, ...]:
    """Edge keep-masks without the edges into ``pruned_depths``; entry d is bool [N_{d+1}]."""
    pruned = frozenset(pruned_depths)
    if any(not 1 <= d <= forest.num_steps for d in pruned):
        raise ValueError(f"pruned depths must be in [1, {forest.num_steps}], got {sorted(pruned)}")
    sizes = forest.nodes_per_depth[1:]
    return tuple(torch.full((n,), d + 1 not in pruned, dtype=torch.bool) for d, n in enumerate(sizes))


def width_prune_mask(forest: Forest, leaf_scores: Tensor, keep: int) -> tuple[Tensor, ...]:
    """Keep the post-split chains of each tree's best and worst leaves (BranchGRPO width pruning).

    Post-split edges are those of steps ``i > s = max(split_steps)`` (every step when there are no
    splits), i.e. edge index d > s, child depth > s + 1; each such node has exactly one leaf below.
    Per tree they are kept only on the paths of the ``keep // 2`` best and ``keep - keep // 2``
    worst leaves by score (ties: the lower index ranks lower). Edges of steps <= s, the last split's
    own edges included, are all kept. This is the reference's mode 2 taken per tree and by leaf
    (the reference ranks the transitions of all trees on a rank); its mode 1 (bug B7) is not copied.

    Args:
        forest: the forest shape.
        leaf_scores: [n_leaves] score per leaf, e.g. the reward or the leaf advantage.
        keep: leaves kept per tree, ``0 <= keep <= leaves per tree``.

    Returns:
        Edge keep-masks, entry d is bool [N_{d+1}].
    """
    per_tree = forest.num_leaves // forest.n_trees
    if not 0 <= keep <= per_tree:
        raise ValueError(f"keep must be in [0, {per_tree}] (leaves per tree), got {keep}")
    if leaf_scores.shape != (forest.num_leaves,):
        raise ValueError(f"leaf_scores must be [{forest.num_leaves}], got {tuple(leaf_scores.shape)}")
    kept_leaves = best_and_worst(leaf_scores.detach(), forest.n_trees, keep)  # [n_leaves]
    last_split = max(forest.split_steps, default=-1)
    paths = leaf_paths(forest)  # [n_leaves, T + 1]
    masks = []
    for depth, n in enumerate(forest.nodes_per_depth[1:]):
        mask = torch.ones(n, dtype=torch.bool)  # [N_{d+1}]
        if depth > last_split:
            mask[paths[:, depth + 1]] = kept_leaves
        masks.append(mask)
    return tuple(masks)


def combine_masks(*masks: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Elementwise AND of edge keep-masks: an edge survives only if every mask keeps it."""
    if not masks:
        raise ValueError("combine_masks needs at least one mask")
    return tuple(torch.stack(per_depth).all(dim=0) for per_depth in zip(*masks, strict=True))


def edge_counts(mask: tuple[Tensor, ...]) -> int:
    """Number of edges an edge keep-mask keeps."""
    return sum(int(m.sum()) for m in mask)
