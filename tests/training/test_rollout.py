"""Batched chain and tree rollouts against hand counts and an unbatched reference traversal."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrove.grpo import plans, tree
from flowgrove.samplers import schedules
from flowgrove.samplers.steps import euler_step, noise_g, sde_step, sde_type_of
from flowgrove.training.rollout import RolloutSpec, rescore, rollout


# (noise kind, level, split noise scale): BranchGRPO's, and CPS with split children drawing 2 x sin(0.15 pi) = 0.91
# of the next noise level afresh
NOISES = {"constant": ("constant", 0.3, 4.0), "cps": ("cps", 0.3, 2.0)}


def _tree_spec(num_steps: int, splits: tuple[int, ...], reward_image: str = "final", sde=None,
               noise: str = "constant") -> RolloutSpec:
    sigmas = schedules.flux_sigmas(num_steps, 3.0)
    sde = set(range(num_steps)) if sde is None else sde
    plan = plans.sde_mask_plan(sigmas, sde, sde)
    branching = tuple(2 if i in splits else 1 for i in range(num_steps))
    kind, level, scale = NOISES[noise]
    return RolloutSpec(plan, kind, level, reward_image=reward_image, branching=branching, split_noise_scale=scale)


def test_tree_counts_match_the_forest(tiny_policy):
    # 20 steps, splits 0,3,6,9, K = 2: per tree 1 + 2*3 + 4*3 + 8*3 + 16*10 = 203 model calls, 16 leaves; with the
    # final sample as the image every one of the 218 edges is sampled and stored.
    spec = _tree_spec(20, (0, 3, 6, 9))
    cond = tiny_policy.encode_prompts(["zero", "one"])
    ro = rollout(tiny_policy, cond, torch.tensor([0, 1]), torch.randn(2, 1, 4, 4), spec, torch.Generator().manual_seed(0))
    forest = tree.build_forest(20, (0, 3, 6, 9), 2, n_trees=2)
    assert ro.model_calls == forest.model_calls == 2 * 203
    assert ro.leaves.shape[0] == forest.num_leaves == 32
    assert len(ro.transitions) == forest.num_edges == 2 * 218
    assert ro.nodes_per_depth == forest.nodes_per_depth
    # leaves keep their tree's prompt: the first 16 belong to tree 0
    assert ro.leaf_cond_index.tolist() == [0] * 16 + [1] * 16


def test_x0_pred_image_skips_the_last_transition(tiny_policy):
    # DanceGRPO's reward image is x0_pred at the last step: T model calls per chain, T - 1 stored transitions.
    sigmas = schedules.flux_sigmas(6, 3.0)
    spec = RolloutSpec(plans.all_sde_plan(sigmas), "constant", 0.3, reward_image="x0_pred")
    cond = tiny_policy.encode_prompts(["zero"])
    ro = rollout(tiny_policy, cond, torch.zeros(3, dtype=torch.long), torch.randn(3, 1, 4, 4), spec, torch.Generator())
    assert ro.model_calls == 3 * 6
    assert len(ro.transitions) == 3 * 5
    assert set(ro.transitions.depth.tolist()) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("noise", list(NOISES))
def test_batched_tree_equals_unbatched_traversal(tiny_policy, noise):
    # Same tree, same noise: the reference visits one node at a time, depth first, with batch-1 model calls.
    num_steps, splits = 5, (0, 2)
    spec = _tree_spec(num_steps, splits, sde={0, 1, 2, 4}, noise=noise)  # step 3 is an ODE step
    kind, level, scale = NOISES[noise]
    sigmas = spec.plan.sigmas
    cond = tiny_policy.encode_prompts(["zero", "two"])
    x_init = torch.randn(2, 1, 4, 4)
    ro = rollout(tiny_policy, cond, torch.tensor([0, 1]), x_init, spec, torch.Generator().manual_seed(3))
    # Re-draw the noise exactly as the batched rollout did: one randn per SDE step over all nodes of the next depth.
    gen = torch.Generator().manual_seed(3)
    forest = tree.build_forest(num_steps, splits, 2, n_trees=2)
    noises = {i: torch.randn((forest.nodes_per_depth[i + 1], 1, 4, 4), generator=gen) for i in sorted(spec.plan.sde_steps)}
    leaves = {}

    def visit(x, step, node, row):
        if step == num_steps:
            leaves[node] = x
            return
        s, s_next = sigmas[step].item(), sigmas[step + 1].item()
        v = tiny_policy.velocity(x, torch.tensor([s]), cond.select(torch.tensor([row])))
        k = 2 if step in splits else 1
        for c in range(k):
            child = node * k + c
            if spec.plan.kinds[step] == "sde":
                g = noise_g(kind, level, torch.tensor(s), torch.tensor(s_next))
                out = sde_step(x, v, s, s_next, g, sde_type=sde_type_of(kind), noise_scale=scale if k > 1 else 1.0,
                               noise=noises[step][child : child + 1])
                nxt = out.x_next
            else:
                nxt = euler_step(x, v, s, s_next)
            visit(nxt, step + 1, child, row)

    with torch.no_grad():
        for t in range(2):
            visit(x_init[t : t + 1], 0, t, t)
    reference = torch.cat([leaves[i] for i in range(len(leaves))])
    torch.testing.assert_close(ro.leaves, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", list(NOISES))
def test_rescoring_the_stored_transitions_gives_ratio_one(tiny_policy, noise):
    # The old log-prob is computed on the stored float32 tensors, so re-scoring with unchanged weights gives
    # exactly the same numbers (ratio exp(0) = 1) for every stored transition, split children included.
    spec = _tree_spec(6, (0, 2), noise=noise)
    cond = tiny_policy.encode_prompts(["zero", "one"])
    ro = rollout(tiny_policy, cond, torch.tensor([0, 1]), torch.randn(2, 1, 4, 4), spec, torch.Generator().manual_seed(1))
    tr = ro.transitions
    with torch.no_grad():
        for depth in tr.depth.unique():
            rows = (tr.depth == depth).nonzero().flatten()
            log_prob, _ = rescore(tiny_policy, tr.select(rows), cond, spec.noise)
            assert torch.equal(log_prob, tr.old_log_prob[rows])
        log_prob, _ = rescore(tiny_policy, tr, cond, spec.noise)  # mixed steps in one batch: equal up to float rounding
    torch.testing.assert_close(log_prob, tr.old_log_prob, rtol=0, atol=1e-5)


def test_split_children_are_scored_with_their_own_std(tiny_policy):
    # BranchGRPO bug B1: the reference scores a split child with the unscaled std. Here it is the drawn one.
    spec = _tree_spec(3, (0,))
    cond = tiny_policy.encode_prompts(["zero"])
    ro = rollout(tiny_policy, cond, torch.tensor([0]), torch.randn(1, 1, 4, 4), spec, torch.Generator().manual_seed(0))
    first = ro.transitions.select((ro.transitions.depth == 1).nonzero().flatten())
    assert first.noise_scale.tolist() == [4.0, 4.0]
    s0, s1 = spec.plan.sigmas[0].item(), spec.plan.sigmas[1].item()
    v = tiny_policy.velocity(first.x, first.sigma, cond.select(first.cond_index)).detach()
    mean = sde_step(first.x, v, s0, s1, 0.3).mean
    std = 4.0 * 0.3 * (s0 - s1) ** 0.5
    expected = torch.distributions.Normal(mean, std).log_prob(first.x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(first.old_log_prob, expected, rtol=1e-5, atol=1e-6)


def test_cps_split_children_are_cps_steps_with_the_scaled_fraction(tiny_policy):
    # A CPS split child draws noise_scale * g * sigma_next around the CPS mean of that std (the coefficients stay the
    # flow's), is scored under it, and re-scoring as an "sde" step would give another density.
    spec = _tree_spec(3, (0,), noise="cps")
    cond = tiny_policy.encode_prompts(["zero"])
    ro = rollout(tiny_policy, cond, torch.tensor([0]), torch.randn(1, 1, 4, 4), spec, torch.Generator().manual_seed(0))
    first = ro.transitions.select((ro.transitions.depth == 1).nonzero().flatten())
    s0, s1 = spec.plan.sigmas[0].item(), spec.plan.sigmas[1].item()
    fraction = 2.0 * math.sin(0.3 * math.pi / 2)
    v = tiny_policy.velocity(first.x, first.sigma, cond.select(first.cond_index)).detach()
    x0 = first.x - s0 * v
    mean = (1 - s1) * x0 + math.sqrt(s1**2 - (fraction * s1) ** 2) * (x0 + v)
    expected = torch.distributions.Normal(mean, fraction * s1).log_prob(first.x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(first.old_log_prob, expected, rtol=1e-5, atol=1e-6)
    other, _ = rescore(tiny_policy, first, cond, "constant")
    assert not torch.allclose(other, first.old_log_prob)


def test_dpm_tail_uses_x0_history(tiny_policy):
    # A window plan with a DPM tail ends at sigma 0 with the last x0 prediction; NFE = number of grid steps.
    plan = plans.window_plan(25, 3.0, 0, 4, tail="dpm", ratio=0.2)
    spec = RolloutSpec(plan, "flow", 0.7, reward_image="final")
    cond = tiny_policy.encode_prompts(["one"])
    ro = rollout(tiny_policy, cond, torch.zeros(4, dtype=torch.long), torch.randn(4, 1, 4, 4), spec, torch.Generator())
    assert ro.model_calls == 4 * 7
    assert len(ro.transitions) == 4 * 4
    assert torch.isfinite(ro.leaves).all()


def test_shared_ode_prefix_is_exact_and_saves_calls(tiny_policy):
    # MixGRPO with the window at steps 3..6: steps 0..2 are ODE from a noise the whole group shares, so they are
    # computed once per group (and so is the velocity at step 3). Leaves and stored transitions are identical.
    plan = plans.window_plan(10, 3.0, 3, 4)
    spec = RolloutSpec(plan, "flow", 0.7, reward_image="final")
    cond = tiny_policy.encode_prompts(["zero", "one"])
    rows = torch.tensor([0, 1]).repeat_interleave(4)
    x_init = torch.randn(2, 1, 4, 4).repeat_interleave(4, dim=0)
    groups = torch.arange(2).repeat_interleave(4)
    plain = rollout(tiny_policy, cond, rows, x_init, spec, torch.Generator().manual_seed(5))
    shared = rollout(tiny_policy, cond, rows, x_init, spec, torch.Generator().manual_seed(5), groups=groups)
    assert plain.model_calls == 8 * 10
    assert shared.model_calls == 2 * 4 + 8 * 6  # the first SDE step still starts from the shared latent
    torch.testing.assert_close(shared.leaves, plain.leaves, rtol=1e-6, atol=1e-6)
    for a, b in zip(shared.transitions, plain.transitions):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert shared.nodes_per_depth == plain.nodes_per_depth
