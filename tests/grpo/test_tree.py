"""Tests for flowgrove.grpo.tree: forest shape, reward fusion, advantages and pruning, worked by hand."""

import math

import pytest
import torch

from flowgrove.grpo.advantages import tree_zscores
from flowgrove.grpo.tree import (
    Forest,
    best_and_worst,
    build_forest,
    combine_masks,
    depth_prune_mask,
    depth_pruned_depths,
    depthwise_advantages,
    edge_counts,
    fuse_rewards,
    leaf_paths,
    parse_split_steps,
    pruning_active,
    split_steps_evenly,
    width_prune_mask,
)
from flowgrove.grpo.tree_rules import adaptive_split_counts, backprop_advantages


def _as_lists(tensors):
    return [t.tolist() for t in tensors]


# --------------------------------------------------------------------------- shape and counts


def test_reference_forest_counts():
    # T = 20, splits 0,3,6,9, K = 2: N_d = 1 | 2,2,2 | 4,4,4 | 8,8,8 | 16 x 11 (depths 10..20).
    forest = build_forest(20, "0,3,6,9")
    assert forest.nodes_per_depth == (1, 2, 2, 2, 4, 4, 4, 8, 8, 8) + (16,) * 11
    assert forest.num_leaves == 16  # 2 ** 4
    assert forest.model_calls == 203  # depths 0..19: 1 + 2*3 + 4*3 + 8*3 + 16*10
    assert forest.num_edges == 218  # depths 1..20: 2*3 + 4*3 + 8*3 + 16*11
    assert forest.nfe_per_leaf == pytest.approx(203 / 16)  # 12.6875
    assert forest.is_split_step(3) and not forest.is_split_step(4)


def test_branching_three_counts():
    # T = 4, splits 0,2, K = 3: N = 1, 3, 3, 9, 9.
    forest = build_forest(4, (2, 0), branching=3)
    assert forest.split_steps == (0, 2)
    assert forest.nodes_per_depth == (1, 3, 3, 9, 9)
    assert forest.num_leaves == 9
    assert forest.model_calls == 16  # 1 + 3 + 3 + 9
    assert forest.num_edges == 24  # 3 + 3 + 9 + 9
    assert forest.parents[2].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # siblings adjacent


def test_split_at_last_step():
    # T = 3, split only at step 2: a chain of 3 nodes, then 2 leaves.
    forest = build_forest(3, [2])
    assert forest.nodes_per_depth == (1, 1, 1, 2)
    assert (forest.num_leaves, forest.model_calls, forest.num_edges) == (2, 3, 4)  # calls 1+1+1, edges 1+1+2


def test_two_trees_double_counts_and_tree_of():
    one, two = build_forest(20, "0,3,6,9"), build_forest(20, "0,3,6,9", n_trees=2)
    assert two.nodes_per_depth == tuple(2 * n for n in one.nodes_per_depth)
    # 436 edges = the reference's transitions per GPU (2 prompts)
    assert (two.num_leaves, two.model_calls, two.num_edges) == (32, 406, 436)
    assert two.nfe_per_leaf == one.nfe_per_leaf
    assert two.tree_of[0].tolist() == [0, 1]
    assert two.tree_of[1].tolist() == [0, 0, 1, 1]
    assert two.tree_of[4].tolist() == [0] * 4 + [1] * 4  # tree-major
    assert two.parents[0].tolist() == [0, 0, 1, 1]
    assert two.parents[1].tolist() == [0, 1, 2, 3]  # no split at step 1
    for depth, parent in enumerate(two.parents):  # a child belongs to its parent's tree
        assert torch.equal(two.tree_of[depth][parent], two.tree_of[depth + 1])


def test_no_splits_is_a_chain():
    forest = build_forest(5, (), n_trees=3)
    assert forest.nodes_per_depth == (3,) * 6
    assert (forest.num_leaves, forest.model_calls, forest.num_edges) == (3, 15, 15)
    assert forest.nfe_per_leaf == 5


def test_forest_is_hashable_and_normalizes_split_steps():
    assert Forest(4, (2, 0)) == build_forest(4, "0,2")
    assert hash(Forest(4, (2, 0))) == hash(build_forest(4, "0,2"))


def test_split_steps_evenly():
    assert split_steps_evenly(20, 4) == (0, 5, 10, 15)  # 20 // 4 = 5
    assert split_steps_evenly(10, 3) == (0, 3, 6)  # 10 // 3 = 3
    assert split_steps_evenly(5, 0) == ()
    with pytest.raises(ValueError, match="rounds"):
        split_steps_evenly(3, 4)


def test_parse_split_steps():
    assert parse_split_steps("9, 0,3,6", 20) == (0, 3, 6, 9)
    assert parse_split_steps([], 20) == ()
    assert parse_split_steps("", 20) == ()
    for bad in ("0,20", [-1], [0, 3, 3], "0,x", [1.5]):
        with pytest.raises(ValueError, match="split steps"):
            parse_split_steps(bad, 20)


def test_forest_argument_errors():
    with pytest.raises(ValueError, match="branching"):
        build_forest(4, "0", branching=1)
    with pytest.raises(ValueError, match="n_trees"):
        build_forest(4, "0", n_trees=0)
    with pytest.raises(ValueError, match="num_steps"):
        build_forest(0, ())


def test_leaf_paths():
    # T = 3, splits 0 and 2, two trees: N = 2, 4, 4, 8.
    paths = leaf_paths(build_forest(3, "0,2", n_trees=2))
    assert paths.tolist() == [
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 1, 1, 2],
        [0, 1, 1, 3],
        [1, 2, 2, 4],
        [1, 2, 2, 5],
        [1, 3, 3, 6],
        [1, 3, 3, 7],
    ]


# --------------------------------------------------------------------------- reward fusion

LEAVES = torch.tensor([1.0, 3.0, 5.0, 7.0])
LOG3 = math.log(3.0)
# T = 2, splits 0 and 1: root -> {a, b} -> a: {1, 3}, b: {5, 7}. Edge log-probs make simple softmaxes:
# into a, b: [0, log 3] -> local weights [1/4, 3/4];
# into the leaves: [0, log 3 | 0, 0] -> [1/4, 3/4 | 1/2, 1/2].
EDGE_LOG_PROBS = (torch.tensor([0.0, LOG3]), torch.tensor([0.0, LOG3, 0.0, 0.0]))


def test_fuse_mean_hand_worked():
    levels = fuse_rewards(LEAVES, build_forest(2, "0,1"))
    assert _as_lists(levels) == [[4.0], [2.0, 6.0], [1.0, 3.0, 5.0, 7.0]]  # (1+3)/2, (5+7)/2, (1+3+5+7)/4


def test_fuse_mean_through_chain_steps():
    # T = 3, splits 0 and 2: depth 1 and 2 both hold the two subtree means.
    levels = fuse_rewards(LEAVES, build_forest(3, "0,2"))
    assert _as_lists(levels) == [[4.0], [2.0, 6.0], [2.0, 6.0], [1.0, 3.0, 5.0, 7.0]]


def test_fuse_local_hand_worked():
    levels = fuse_rewards(LEAVES, build_forest(2, "0,1"), "local", EDGE_LOG_PROBS)
    # a = 1/4*1 + 3/4*3 = 2.5; b = 1/2*5 + 1/2*7 = 6; root = 1/4*2.5 + 3/4*6 = 0.625 + 4.5 = 5.125
    torch.testing.assert_close(levels[1], torch.tensor([2.5, 6.0]))
    torch.testing.assert_close(levels[0], torch.tensor([5.125]))


def test_fuse_path_hand_worked():
    levels = fuse_rewards(LEAVES, build_forest(2, "0,1"), "path", EDGE_LOG_PROBS)
    # Path probabilities exp(sum log-prob): leaf 1: 1*1 = 1, leaf 3: 1*3 = 3, leaf 5: 3*1, leaf 7: 3*1.
    # root = (1*1 + 3*3 + 3*5 + 3*7) / (1 + 3 + 3 + 3) = 46 / 10 = 4.6 (local gave 5.125).
    # a and b see one split below them, so they match the local weighting: 2.5 and 6.
    torch.testing.assert_close(levels[0], torch.tensor([4.6]))
    torch.testing.assert_close(levels[1], torch.tensor([2.5, 6.0]))
    # temperature 2 takes square roots of the path probabilities: weights 1, sqrt3, sqrt3, sqrt3.
    hot = fuse_rewards(LEAVES, build_forest(2, "0,1"), "path", EDGE_LOG_PROBS, temperature=2.0)
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(hot[0], torch.tensor([(1 + s3 * (3 + 5 + 7)) / (1 + 3 * s3)]))


def _descendant_leaves(forest):
    """Leaves below each node, per depth, by walking parents in plain Python (independent of leaf_paths)."""
    owner = list(range(forest.num_leaves))  # ancestor at the current depth of each leaf
    below = [None] * (forest.num_steps + 1)
    below[-1] = [[leaf] for leaf in owner]
    for depth in reversed(range(forest.num_steps)):
        parent = forest.parents[depth].tolist()
        owner = [parent[node] for node in owner]
        nodes = range(forest.nodes_per_depth[depth])
        below[depth] = [[leaf for leaf, o in enumerate(owner) if o == node] for node in nodes]
    return below


def _path_log_probs(forest, edge_log_probs, start_depth):
    """Per leaf, the sum of edge log-probs from ``start_depth`` down, walking parents in Python."""
    totals = []
    for leaf in range(forest.num_leaves):
        node, total = leaf, 0.0
        for depth in reversed(range(start_depth, forest.num_steps)):
            total += float(edge_log_probs[depth][node])
            node = int(forest.parents[depth][node])
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


@pytest.mark.parametrize("branching", [2, 3])
def test_fuse_path_matches_global_path_softmax_with_and_without_prefix(branching):
    forest = build_forest(5, "0,2,3", branching=branching, n_trees=2)
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(forest.num_leaves, generator=gen, dtype=torch.float64)
    log_probs = tuple(torch.randn(n, generator=gen, dtype=torch.float64) for n in forest.nodes_per_depth[1:])
    temperature = 0.7
    levels = fuse_rewards(rewards, forest, "path", log_probs, temperature)
    full = _path_log_probs(forest, log_probs, 0)  # whole root-to-leaf path
    for depth, nodes in enumerate(_descendant_leaves(forest)):
        suffix = _path_log_probs(forest, log_probs, depth)  # only the edges below depth
        for node, leaves in enumerate(nodes):
            by_full = torch.softmax(full[leaves] / temperature, 0) @ rewards[leaves]
            by_suffix = torch.softmax(suffix[leaves] / temperature, 0) @ rewards[leaves]
            torch.testing.assert_close(by_full, by_suffix)  # the shared prefix cancels
            torch.testing.assert_close(levels[depth][node], by_full)


def test_fuse_local_matches_product_of_local_softmaxes():
    forest = build_forest(5, "0,2,3", branching=3, n_trees=2)
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(forest.num_leaves, generator=gen, dtype=torch.float64)
    log_probs = tuple(torch.randn(n, generator=gen, dtype=torch.float64) for n in forest.nodes_per_depth[1:])
    levels = fuse_rewards(rewards, forest, "local", log_probs)
    # Reference by recursion in Python: node = sum_c softmax_c(lp_c) * child; one child passes its value up.
    expected = rewards.tolist()
    for depth in reversed(range(forest.num_steps)):
        parent = forest.parents[depth].tolist()
        values = []
        for node in range(forest.nodes_per_depth[depth]):
            kids = [c for c, p in enumerate(parent) if p == node]
            weights = torch.softmax(log_probs[depth][kids], 0).tolist()
            values.append(sum(w * expected[c] for w, c in zip(weights, kids)))
        expected = values
        torch.testing.assert_close(levels[depth], torch.tensor(expected, dtype=torch.float64))


def test_fuse_single_child_passes_reward_up_in_local_mode():
    # T = 3, splits 0 and 2: step 1 is a chain; its (arbitrary) log-probs must not change anything.
    log_probs = (torch.zeros(2), torch.tensor([5.0, -5.0]), torch.zeros(4))
    levels = fuse_rewards(LEAVES, build_forest(3, "0,2"), "local", log_probs)
    assert _as_lists(levels[1:3]) == [[2.0, 6.0], [2.0, 6.0]]


def test_fuse_with_equal_log_probs_is_the_mean():
    forest = build_forest(4, "0,1,3", n_trees=2)
    rewards = torch.arange(float(forest.num_leaves))
    zeros = tuple(torch.zeros(n) for n in forest.nodes_per_depth[1:])  # e.g. all-ODE edges
    mean = fuse_rewards(rewards, forest)
    for mode in ("path", "local"):
        for got, want in zip(fuse_rewards(rewards, forest, mode, zeros), mean):
            torch.testing.assert_close(got, want)


def test_fuse_argument_errors():
    forest = build_forest(2, "0,1")
    with pytest.raises(ValueError, match="mode"):
        fuse_rewards(LEAVES, forest, "max")
    with pytest.raises(ValueError, match="edge_log_probs"):
        fuse_rewards(LEAVES, forest, "path")
    with pytest.raises(ValueError, match="edge_log_probs"):
        fuse_rewards(LEAVES, forest, "local", (torch.zeros(2), torch.zeros(3)))
    with pytest.raises(ValueError, match="leaf_rewards"):
        fuse_rewards(torch.zeros(3), forest)
    with pytest.raises(ValueError, match="temperature"):
        fuse_rewards(LEAVES, forest, "path", EDGE_LOG_PROBS, temperature=0.0)


# --------------------------------------------------------------------------- depth-wise advantages


def test_depthwise_advantages_hand_worked():
    forest = build_forest(2, "0,1")
    adv = depthwise_advantages(fuse_rewards(LEAVES, forest), forest)
    assert adv[0].tolist() == [0.0]  # one node: zero
    # depth 1: [2, 6], mean 4, sample std sqrt((4 + 4) / 1) = 2*sqrt2 -> -+2 / (2*sqrt2) = -+1/sqrt2
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 1.0]) / math.sqrt(2.0))
    # depth 2: [1, 3, 5, 7], mean 4, sample var (9 + 1 + 1 + 9) / 3 = 20/3
    torch.testing.assert_close(adv[2], torch.tensor([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(20.0 / 3.0))
    # ddof 0: population var 20 / 4 = 5
    pop = depthwise_advantages(fuse_rewards(LEAVES, forest), forest, ddof=0)
    torch.testing.assert_close(pop[2], torch.tensor([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(5.0))
    torch.testing.assert_close(pop[1], torch.tensor([-1.0, 1.0]))  # [2, 6]: population std 2


def test_depthwise_advantages_per_tree_constant_and_chain_depths():
    # Two trees, T = 3, split only at step 1: depth 1 has one node per tree (a chain) -> zeros.
    forest = build_forest(3, "1", n_trees=2)
    leaves = torch.tensor([1.0, 3.0, 2.0, 2.0])  # tree 0: [1, 3], tree 1 constant
    adv = depthwise_advantages(fuse_rewards(leaves, forest), forest)
    assert adv[0].tolist() == [0.0, 0.0] and adv[1].tolist() == [0.0, 0.0]
    s = 1.0 / math.sqrt(2.0)  # two nodes, ddof 1: +-1/sqrt2
    for depth in (2, 3):
        # tree 1 is constant: zeros, no NaN
        torch.testing.assert_close(adv[depth], torch.tensor([-s, s, 0.0, 0.0]))


def test_depthwise_advantages_are_standardized_per_tree_and_depth():
    forest = build_forest(6, "0,2,4", branching=3, n_trees=3)
    rewards = torch.randn(forest.num_leaves, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    levels = fuse_rewards(rewards, forest)
    adv = depthwise_advantages(levels, forest, eps=0.0)
    for depth, a in enumerate(adv):
        per_tree = a.reshape(forest.n_trees, -1)  # tree-major
        assert torch.isfinite(a).all()
        torch.testing.assert_close(per_tree.mean(1), torch.zeros(forest.n_trees, dtype=torch.float64))
        if per_tree.shape[1] > 1:
            torch.testing.assert_close(per_tree.std(1), torch.ones(forest.n_trees, dtype=torch.float64))
        else:
            assert depth == 0 and (a == 0).all()


def test_depthwise_advantages_tiny_std_is_zero():
    forest = build_forest(1, "0")
    adv = depthwise_advantages((torch.tensor([0.0]), torch.tensor([1.0, 1.0 + 1e-7])), forest)
    assert adv[1].tolist() == [0.0, 0.0]  # std 7e-8 < min_std 1e-6


# --------------------------------------------------------------------------- TreeGRPO's backed-up advantages


def test_backprop_advantages_hand_worked():
    forest = build_forest(2, "0,1")
    adv = backprop_advantages(LEAVES, forest)
    s = math.sqrt(20.0 / 3.0)  # leaves [1, 3, 5, 7]: mean 4, sample std sqrt(20/3), one normalisation per tree
    torch.testing.assert_close(adv[2], torch.tensor([-3.0, -1.0, 1.0, 3.0]) / s)
    torch.testing.assert_close(adv[1], torch.tensor([-2.0, 2.0]) / s)  # subtree means [2, 6] - 4, not re-scaled
    assert adv[0].tolist() == [0.0]
    # BranchGRPO's depth-wise rule re-normalises depth 1 to +-1/sqrt2 = 0.707; here it keeps the leaves' scale, 0.775
    assert depthwise_advantages(fuse_rewards(LEAVES, forest), forest)[1][1] < adv[1][1]


def test_backprop_advantages_are_subtree_means_of_leaf_zscores_per_tree():
    forest = build_forest(6, "0,2,4", branching=3, n_trees=3)
    rewards = torch.randn(forest.num_leaves, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    adv = backprop_advantages(rewards, forest, eps=0.0)
    per_tree = rewards.reshape(3, -1)
    leaf_z = ((per_tree - per_tree.mean(1, keepdim=True)) / per_tree.std(1, keepdim=True)).reshape(-1)
    for depth, (a, mean) in enumerate(zip(adv, fuse_rewards(rewards, forest))):
        tree_mean = per_tree.mean(1).repeat_interleave(forest.nodes_per_depth[depth] // 3)
        tree_std = per_tree.std(1).repeat_interleave(forest.nodes_per_depth[depth] // 3)
        torch.testing.assert_close(a, (mean - tree_mean) / tree_std)  # (subtree mean - tree mean) / leaf std
    torch.testing.assert_close(adv[-1], leaf_z)
    # the shallow splits carry less than unit variance: their subtree means vary less than the leaves
    assert adv[1].reshape(3, -1).std(1).max() < 1.0


def test_backprop_advantages_constant_tree_and_path_weights():
    forest = build_forest(2, "1", n_trees=2)
    adv = backprop_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), forest)
    assert adv[2][2:].tolist() == [0.0, 0.0] and adv[1].tolist() == [0.0, 0.0]  # constant tree; a chain depth is 0
    assert tree_zscores(torch.tensor([5.0]), 1).tolist() == [0.0]  # one value: 0, not NaN
    two = build_forest(2, "0,1")
    weighted = backprop_advantages(LEAVES, two, mode="path", edge_log_probs=EDGE_LOG_PROBS)
    want = fuse_rewards(tree_zscores(LEAVES, 1), two, "path", EDGE_LOG_PROBS)
    for got, expected in zip(weighted, want):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="leaf_rewards must be"):
        backprop_advantages(torch.zeros(3), two)


# --------------------------------------------------------------------------- adaptive trees


def test_adaptive_split_counts_hand_worked():
    # T = 20, splits 0,3,6,9, K = 2. Calls = sum of nodes over depths 0..19.
    assert adaptive_split_counts(20, [0, 3, 6, 9], 2, 203) == (1, 2, 4, 8)  # the full tree fits
    # 160: m = 1, 2, 3, 5 -> nodes 1 | 2 x3 | 4 x3 | 7 x3 | 12 x10: 1 + 6 + 12 + 21 + 120 = 160
    assert adaptive_split_counts(20, [0, 3, 6, 9], 2, 160) == (1, 2, 3, 5)
    assert adaptive_split_counts(20, [0, 3, 6, 9], 2, 159) == (1, 2, 3, 4)  # 1 + 6 + 12 + 21 + 110 = 150
    assert adaptive_split_counts(20, [0, 3, 6, 9], 2, 80) == (1, 1, 1, 1)  # 1 + 6 + 9 + 12 + 50 = 78
    with pytest.raises(ValueError, match="78 calls"):
        adaptive_split_counts(20, [0, 3, 6, 9], 2, 77)


def test_best_and_worst_per_tree():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 2.0, 2.0, 1.0, 3.0])  # two trees of four
    # 3 per tree: the best one and the worst two; the tie 2.0, 2.0 ranks the lower index lower
    assert best_and_worst(scores, 2, 3).tolist() == [False, True, True, True, True, False, True, True]
    assert best_and_worst(scores, 2, 1).tolist() == [False, True, False, False, False, False, True, False]
    assert not best_and_worst(scores, 2, 0).any() and best_and_worst(scores, 2, 4).all()
    with pytest.raises(ValueError, match="count must be in"):
        best_and_worst(scores, 2, 5)


def test_forest_with_fan_out_hand_built():
    # Two trees, T = 3, splits at 0 and 1; at step 1 only the second node of each tree splits (3 children):
    # tree 0: r -> {a, b}; a -> a1; b -> b1, b2, b3; every node one child at step 2.
    fan = (torch.tensor([2, 2]), torch.tensor([1, 3, 1, 3]), torch.ones(8, dtype=torch.long))
    forest = Forest(3, (0, 1), 3, 2, fan)
    assert forest.nodes_per_depth == (2, 4, 8, 8) and forest.model_calls == 14 and forest.num_leaves == 8
    assert forest.parents[1].tolist() == [0, 1, 1, 1, 2, 3, 3, 3]
    leaves = torch.tensor([4.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    fused = fuse_rewards(leaves, forest)
    assert fused[1].tolist() == [4.0, 2.0, 0.0, 0.0] and fused[0].tolist() == [2.5, 0.0]  # root: mean of its 4 leaves
    adv = depthwise_advantages(fused, forest)
    torch.testing.assert_close(adv[1], torch.tensor([1.0, -1.0, 0.0, 0.0]) / math.sqrt(2.0))
    assert leaf_paths(forest)[:4, 1].tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="same number of nodes"):
        Forest(3, (0, 1), 3, 2, (torch.tensor([2, 2]), torch.tensor([1, 3, 1, 1]), torch.ones(6, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"fan_out\[1\] must be"):
        Forest(3, (0, 1), 3, 2, (torch.tensor([2, 2]), torch.tensor([0, 3, 1, 3]), torch.ones(8, dtype=torch.long)))


# --------------------------------------------------------------------------- pruning


def test_depth_pruned_depths_static_and_sliding():
    band = {15, 16, 17, 18}
    assert depth_pruned_depths(band, 1000) == frozenset(band)  # no sliding
    assert depth_pruned_depths(band, 29, 30, 9) == frozenset(band)  # 29 // 30 = 0
    assert depth_pruned_depths(band, 30, 30, 9) == frozenset({14, 15, 16, 17})  # shift 1
    assert depth_pruned_depths(band, 95, 30, 9) == frozenset({12, 13, 14, 15})  # shift 95 // 30 = 3
    assert depth_pruned_depths(band, 300, 30, 9) == frozenset({9, 10, 11, 12})  # min(10, 15 - 9) = 6
    # stop None -> 1: shift min(10000, 15 - 1) = 14
    assert depth_pruned_depths(band, 10_000, 1, None) == frozenset({1, 2, 3, 4})
    # stop deeper than the band: shift min(10, max(0, 15 - 16)) = 0, never deeper
    assert depth_pruned_depths(band, 300, 30, 16) == frozenset(band)
    assert depth_pruned_depths((), 300, 30, 9) == frozenset()
    with pytest.raises(ValueError, match="slide_interval"):
        depth_pruned_depths(band, 1, 0, 9)
    with pytest.raises(ValueError, match=">= 1"):
        depth_pruned_depths({0, 1}, 1)


def test_depth_prune_mask():
    forest = build_forest(20, "0,3,6,9")
    mask = depth_prune_mask(forest, {15, 16, 17, 18})
    assert [bool(m.all()) for m in mask] == [d + 1 not in {15, 16, 17, 18} for d in range(20)]
    assert [bool(m.any()) for m in mask] == [d + 1 not in {15, 16, 17, 18} for d in range(20)]
    assert edge_counts(mask) == 218 - 4 * 16  # 154
    assert edge_counts(depth_prune_mask(forest, ())) == 218
    with pytest.raises(ValueError, match="pruned depths"):
        depth_prune_mask(forest, {21})


def test_width_prune_mask_hand_built_tree():
    # T = 4, splits 0 and 1: N = 1, 2, 4, 4, 4; last split 1, so steps 2 and 3 (edges 2, 3) are post-split.
    forest = build_forest(4, "0,1")
    scores = torch.tensor([0.5, 0.9, 0.1, 0.3])
    mask = width_prune_mask(forest, scores, keep=2)  # best 1: leaf 1 (0.9), worst 1: leaf 2 (0.1)
    assert _as_lists(mask) == [
        [True, True],  # split at step 0: kept
        [True, True, True, True],  # the last split's own edges: kept
        [False, True, True, False],
        [False, True, True, False],
    ]
    assert edge_counts(mask) == 2 + 4 + 2 + 2
    mask = width_prune_mask(forest, scores, keep=3)  # best 1 (leaf 1), worst 2 (leaves 2, 3)
    assert mask[2].tolist() == mask[3].tolist() == [False, True, True, True]
    assert edge_counts(width_prune_mask(forest, scores, keep=4)) == forest.num_edges
    assert edge_counts(width_prune_mask(forest, scores, keep=0)) == 2 + 4  # every post-split edge dropped
    ties = width_prune_mask(forest, torch.zeros(4), keep=2)  # stable: lowest index worst, highest best
    assert ties[3].tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="keep"):
        width_prune_mask(forest, scores, keep=5)
    with pytest.raises(ValueError, match="leaf_scores"):
        width_prune_mask(forest, torch.zeros(8), keep=2)


def test_width_prune_mask_is_per_tree():
    # Two trees, T = 3, split at step 1 -> chain edge at step 2. Tree 1 has all the large scores.
    forest = build_forest(3, "1", n_trees=2)
    mask = width_prune_mask(forest, torch.tensor([0.0, 1.0, 10.0, 11.0]), keep=1)  # worst 1 per tree
    assert mask[2].tolist() == [True, False, True, False]
    assert mask[0].all() and mask[1].all()


def test_width_prune_mask_reference_forest():
    # Two trees of the script's shape. The reference's mode 2 keeps 4 best + 4 worst chains per 2 trees;
    # per tree that is keep = 4 (2 best + 2 worst). 12 of 16 chains per tree lose their 10 post-split
    # edges (steps 10..19):
    # 436 - 2 * 12 * 10 = 196.
    forest = build_forest(20, "0,3,6,9", n_trees=2)
    scores = torch.randn(32, generator=torch.Generator().manual_seed(3))
    mask = width_prune_mask(forest, scores, keep=4)
    assert edge_counts(mask) == 196
    for depth in range(10, 20):  # every post-split depth keeps the same 4 chains per tree
        kept = mask[depth].reshape(2, 16)
        for tree in range(2):
            order = scores.reshape(2, 16)[tree].argsort()
            assert kept[tree, order[:2]].all() and kept[tree, order[-2:]].all()
            assert not kept[tree, order[2:14]].any()
    for depth in range(10):  # steps 0..9, up to and including the last split: untouched
        assert mask[depth].all()
    assert edge_counts(width_prune_mask(forest, scores, keep=8)) == 436 - 2 * 8 * 10  # 276


def test_width_prune_without_splits_prunes_whole_chains():
    forest = build_forest(3, (), n_trees=2)  # one leaf per tree, every step is "after the last split"
    assert edge_counts(width_prune_mask(forest, torch.zeros(2), keep=1)) == 6
    assert edge_counts(width_prune_mask(forest, torch.zeros(2), keep=0)) == 0


def test_combine_masks_and_pruning_active():
    forest = build_forest(4, "0,1")
    depth = depth_prune_mask(forest, {4})
    width = width_prune_mask(forest, torch.tensor([0.5, 0.9, 0.1, 0.3]), keep=2)
    both = combine_masks(depth, width)
    assert _as_lists(both) == [[True, True], [True] * 4, [False, True, True, False], [False] * 4]
    assert edge_counts(both) == 2 + 4 + 2  # depth 4 dropped entirely, depth 3 keeps leaves 1 and 2
    with pytest.raises(ValueError, match="at least one"):
        combine_masks()
    assert pruning_active(300, 300, 1.0)
    assert pruning_active(150, 300, 0.5) and not pruning_active(151, 300, 0.5)  # int(300 * 0.5) = 150
    assert pruning_active(0, 300, 0.0) and not pruning_active(1, 300, 0.0)
