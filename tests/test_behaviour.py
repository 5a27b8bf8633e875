"""Behaviour of the trainer, checked through its public methods: each test fails when the behaviour is wrong.

The trainer's ``score`` (which receives the rollout) and ``update`` (which receives the transitions and their
advantages) are wrapped to observe one step; nothing else about the internals is assumed.
"""

from __future__ import annotations

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.grpo import tree
from flowgrove.grpo.losses import ppo_clip_loss
from flowgrove.samplers.dpm_solver import dpmpp_2m_step
from flowgrove.samplers.steps import x0_from_velocity
from flowgrove.training import method
from flowgrove.training.rollout import rescore
from flowgrove.training.trainer import GRPOTrainer, NonFiniteRewardError, evaluate_policy

from conftest import TinyPolicy, brightness

# One optimizer step per rollout, one micro-batch: the update is a single AdamW step on the whole batch.
ONE_STEP = ["train.micro_batch=100000", "train.accumulate=transitions", "train.accumulate_size=100000"]


def contrast(images, prompts):
    return images.float().std(dim=(1, 2, 3))  # [B]


def make(method_name: str, *extra: str, rewards: dict | None = None) -> GRPOTrainer:
    rewards = rewards or {"brightness": 1.0}
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=4", "rewards={brightness: 1.0}", *extra],
                      method=method_name)
    cfg.rewards = dict(rewards)
    fns = {"brightness": brightness, "contrast": contrast}
    return GRPOTrainer(cfg, TinyPolicy(), {name: fns[name] for name in rewards}, ["zero", "one", "two"])


def zscore(values: torch.Tensor, groups: int, ddof: int, eps: float, global_std: bool = False) -> torch.Tensor:
    """(r - mean) / (std + eps) within contiguous blocks; the std of the block or (global_std) of everything."""
    per_group = values.view(groups, -1)
    std = values.std(correction=ddof) if global_std else per_group.std(1, correction=ddof, keepdim=True)
    return ((per_group - per_group.mean(1, keepdim=True)) / (std + eps)).flatten()


def depthwise(fused, n_trees: int, ddof: int, eps: float) -> torch.Tensor:
    """Per tree and depth z-scores of node rewards, zero where a tree has one node at that depth; concatenated."""
    out = []
    for values in fused:
        per_tree = values.view(n_trees, -1)
        if per_tree.shape[1] <= max(1, ddof):
            out.append(torch.zeros_like(values))
            continue
        out.append(zscore(values, n_trees, ddof, eps))
    return torch.cat(out)


def mean_fusion(leaf_rewards: torch.Tensor, nodes_per_depth) -> list[torch.Tensor]:
    # Siblings are adjacent and trees tree-major, so the leaves below a node at depth d form a contiguous block
    # of N_L / N_d leaves: the node's reward is that block's mean.
    return [leaf_rewards.view(n, -1).mean(1) for n in nodes_per_depth]


def child_values(per_node: torch.Tensor, nodes_per_depth, tr) -> torch.Tensor:
    """Each stored edge's value of its child node (depth, node) from values concatenated over depths. [E]"""
    offsets = torch.tensor([0, *nodes_per_depth]).cumsum(0)
    return per_node[offsets[tr.depth] + tr.node]


def observe(trainer: GRPOTrainer, advantages=None) -> dict:
    """Record the next step's rollout, rewards, transitions and advantages; ``advantages(tr)`` replaces them."""
    seen: dict = {}
    roll, score, update = trainer._rollout, trainer.score, trainer.update

    def spy_rollout(*args):
        seen.update(rollout=roll(*args))
        return seen["rollout"]

    def spy_score(*args):
        raw = score(*args)
        seen.update(raw=raw.clone())  # the last call is the leaves' (an adaptive tree scores x0 predictions first)
        return raw

    def spy_update(tr, adv, n_samples, generator, **kwargs):
        adv = advantages(tr) if advantages is not None else adv
        seen.update(transitions=tr, adv=adv.clone(), n_samples=n_samples,
                    params_before=[p.detach().clone() for p in trainer.params])
        return update(tr, adv, n_samples, generator, **kwargs)

    trainer._rollout, trainer.score, trainer.update = spy_rollout, spy_score, spy_update
    return seen


GUARD_TEMPFLOW_DPPO = ("train.ratio_norm=grpo_guard", "train.step_weight=tempflow", "train.trust_region=dppo")


@pytest.mark.parametrize(("name", "terms"), [(n, ()) for n in ("dancegrpo", "flowgrpo", "mixgrpo", "branchgrpo", "branchgrpo-mix",
                                                                "grpo-guard", "tempflow-grpo")]
                         + [("flowgrpo", GUARD_TEMPFLOW_DPPO), ("branchgrpo", GUARD_TEMPFLOW_DPPO)])
def test_one_update_moves_log_probs_with_the_sign_of_the_advantage(name, terms):
    # Advantages +1 / -1 by node parity (in a tree, siblings get opposite signs). After one AdamW step on
    # -mean(A * ratio) the log-prob of the +1 transitions rises and that of the -1 transitions falls, on average
    # and for most transitions (measured: 61-88 % agree; a flipped loss sign gives the complement). The same holds
    # with GRPO-Guard's re-centred ratio, TempFlow's weights and Flow-DPPO's trust region (a flipped re-centring or
    # a mask on the wrong side would not).
    extra = ["rollout.prompts_per_step=1"] if name.startswith("branch") else []
    trainer = make(name, *ONE_STEP, *extra, *terms)
    seen = observe(trainer, advantages=lambda tr: torch.where(tr.node % 2 == 0, 1.0, -1.0))
    metrics = trainer.step()
    assert metrics["updates"] == 1
    tr, adv = seen["transitions"], seen["adv"]
    with torch.no_grad():
        delta = rescore(trainer.policy, tr, trainer.step_cond, trainer.cfg.sampler.noise)[0] - tr.old_log_prob  # [E]
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()
    assert ((delta * adv) > 0).float().mean() > 0.55


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_a_forward_objective_update_moves_predictions_with_the_sign_of_the_advantage(objective):
    # Forward objectives: advantages +1 / -1 by sample parity. After one AdamW step the data prediction at the
    # trained noised rows moves towards the clean final sample for +1 samples and away from it for -1 samples, on
    # average and for most rows (measured: 85 % (nft) and 73 % (awm) agree; a flipped sign gives the complement).
    trainer = make("dancegrpo", *ONE_STEP, f"train.objective={objective}", "train.clip_range=1.0",
                   "sampler.noise_level=0", "rollout.same_noise_in_group=false")
    seen = observe(trainer, advantages=lambda rows: torch.where(rows.sample % 2 == 0, 1.0, -1.0))
    assert trainer.step()["updates"] == 1
    rows, adv = seen["transitions"], seen["adv"]
    x = (1 - rows.sigma.view(-1, 1, 1, 1)) * rows.x0 + rows.sigma.view(-1, 1, 1, 1) * rows.noise  # flow forward process
    with torch.no_grad():
        v = trainer.policy.velocity(x, rows.sigma, trainer.step_cond.select(rows.cond_index))
    error = lambda out: (x0_from_velocity(x, out, rows.sigma) - rows.x0).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    delta = error(v) - error(rows.old_output)  # [E] < 0: closer to the clean sample
    assert delta[adv > 0].mean() < 0 < delta[adv < 0].mean()
    assert ((delta * adv) < 0).float().mean() > 0.75


@pytest.mark.parametrize(("kind", "ddof"), [("group", 0), ("group_global_std", 1)])
def test_chain_advantages_are_normalised_within_each_group_of_leaves(kind, ddof):
    # The rollout lays the chains out prompt-major: leaves g * G ... g * G + G - 1 are the G images of one prompt.
    # Each chain's stored transitions get the normalised reward of its own leaf, computed within its group.
    # ddof and eps differ from the normalisers' own defaults, so the configured values must reach them.
    g_size = 4
    trainer = make("dancegrpo", "rollout.prompts_per_step=3", f"rollout.group_size={g_size}", f"advantage.kind={kind}",
                   f"advantage.ddof={ddof}", "advantage.eps=0.01")
    seen = observe(trainer)
    trainer.step()
    ro, tr, adv = seen["rollout"], seen["transitions"], seen["adv"]
    reward = seen["raw"][0]  # [N]
    blocks = ro.leaf_cond_index.view(-1, g_size)
    assert (blocks == blocks[:, :1]).all()  # one prompt per block
    assert torch.equal(tr.node.unique(), torch.arange(reward.numel()))  # every chain has stored edges
    want = zscore(reward, 3, ddof, 0.01, global_std=kind == "group_global_std")  # [N]
    torch.testing.assert_close(adv, want[tr.node], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregate", ["reward", "advantage"])
@pytest.mark.parametrize("chains", [True, False], ids=["chains", "trees"])
def test_several_rewards_are_aggregated_as_configured(aggregate, chains):
    # Weights summing to 1: "reward" normalises the weighted reward, "advantage" weights the normalised rewards.
    weights = {"brightness": 0.25, "contrast": 0.75}
    name, extra = ("dancegrpo", []) if chains else ("branchgrpo", ["rollout.prompts_per_step=1"])
    trainer = make(name, *extra, f"advantage.aggregate={aggregate}", "advantage.eps=0", rewards=weights)
    seen = observe(trainer)
    trainer.step()
    raw, tr, adv = seen["raw"], seen["transitions"], seen["adv"]  # raw [2, N]
    w = torch.tensor(list(weights.values()))

    def normalise(r):
        if chains:
            return zscore(r, 2, 1, 0.0)[tr.node]
        nodes = method.forest(trainer.cfg, 1).nodes_per_depth
        return child_values(depthwise(mean_fusion(r, nodes), 1, 1, 0.0), nodes, tr)

    if aggregate == "reward":
        want = normalise((w[:, None] * raw).sum(0))
    else:
        want = w[0] * normalise(raw[0]) + w[1] * normalise(raw[1])
    torch.testing.assert_close(adv, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "fusion"), [("branchgrpo", "mean"), ("branchgrpo", "path"), ("branchgrpo", "local"),
                                            ("flowgrove", "mean"), ("flowgrove", "path")])
def test_tree_advantages_use_the_configured_fusion(name, fusion):
    # branchgrpo: the reward image is the final sample, so the edges into the leaves are trained too. flowgrove: the
    # DPM tail shortens the trees to the plan's 16 steps. ddof 0 and eps 0.05 differ from the depthwise defaults.
    trainer = make(name, "rollout.prompts_per_step=2", f"tree.fusion={fusion}", "tree.temperature=0.5",
                   "sampler.reward_image=final", "advantage.ddof=0", "advantage.eps=0.05")
    seen = observe(trainer)
    trainer.step()
    ro, tr, adv, reward = seen["rollout"], seen["transitions"], seen["adv"], seen["raw"][0]
    num_steps = method.step_plan(trainer.cfg, 0).num_steps
    forest = method.forest(trainer.cfg, 2, num_steps)
    nodes = forest.nodes_per_depth
    assert num_steps == (20 if name == "branchgrpo" else 16)
    assert tr.depth.max() == (num_steps if name == "branchgrpo" else 10)
    fused = mean_fusion(reward, nodes)
    if fusion != "mean":
        fused_mean, fused = fused, tree.fuse_rewards(reward, forest, fusion, ro.edge_log_probs, temperature=0.5)
        assert not torch.allclose(fused[1], fused_mean[1], rtol=1e-3)  # the edge log-probs matter
        assert not torch.allclose(fused[1], tree.fuse_rewards(reward, forest, fusion, ro.edge_log_probs)[1], rtol=1e-3)
    want = child_values(depthwise(fused, 2, 0, 0.05), nodes, tr)  # [E] the child node's advantage
    torch.testing.assert_close(adv, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("stop", "bands"), [(10, [{11, 12}, {10, 11}, {10, 11}, {10, 11}]),
                                           (-1, [{11, 12}, {10, 11}, {9, 10}, {9, 10}])])
def test_depth_pruning_slides_towards_the_root_until_its_stop(stop, bands):
    # Child depths 11, 12 pruned; the band moves one depth per iteration by min(iteration, 11 - stop): it stops at
    # depth 10, or at the default stop, the last split step 9.
    trainer = make("branchgrpo-deppru", "rollout.prompts_per_step=1", "tree.depth_pruning=[11,12]",
                   "tree.depth_slide_interval=1", f"tree.depth_stop={stop}", "train.steps=10")
    trained = set(range(1, 20))  # the x0_pred reward image: the last step (child depth 20) is never trained
    for band in bands:
        seen = observe(trainer)
        trainer.step()
        assert set(seen["transitions"].depth.tolist()) == trained - band


def test_pruning_stops_after_its_fraction_of_training():
    # pruning_fraction 0.4 of 2 steps: active while iteration <= int(0.8) = 0, so the second step trains every edge.
    trainer = make("branchgrpo-deppru", "rollout.prompts_per_step=1", "tree.pruning_fraction=0.4", "train.steps=2")
    assert trainer.step()["transitions"] == 202 - 5 * 16
    assert trainer.step()["transitions"] == 202


@pytest.mark.parametrize("name", ["flowgrpo", "branchgrpo"])
def test_kl_penalty_uses_the_transition_std(name):
    # KL(N(mu, s^2) || N(mu_ref, s^2)) = |mu - mu_ref|^2 / (2 s^2), s = noise_scale * g * sqrt(sigma - sigma_next):
    # Flow-GRPO's flow noise makes g vary per step, BranchGRPO's split edges have noise_scale 4.
    extra = ["rollout.prompts_per_step=1"] if name.startswith("branch") else []
    trainer = make(name, *ONE_STEP, *extra, "train.kl_beta=0.5")
    with torch.no_grad():  # move the policy away from the reference
        for p in trainer.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    seen = observe(trainer, advantages=lambda tr: torch.zeros(len(tr)))  # only the KL term drives this update
    metrics = trainer.step()
    tr = seen["transitions"]
    assert tr.noise_scale.unique().numel() == (2 if name == "branchgrpo" else 1)
    assert tr.g.unique().numel() > 1 or name == "branchgrpo"
    std = tr.noise_scale * tr.g * (tr.sigma - tr.sigma_next).sqrt()  # [E]

    def kl(weights):
        with torch.no_grad(), trainer.weights_swapped(weights):
            mean = rescore(trainer.policy, tr, trainer.step_cond, trainer.cfg.sampler.noise)[1]
            with trainer.weights_swapped(trainer.reference):
                ref_mean = rescore(trainer.policy, tr, trainer.step_cond, trainer.cfg.sampler.noise)[1]
        return ((mean - ref_mean) ** 2 / (2 * std[:, None, None, None] ** 2)).mean().item()  # mean over E and dims

    before = kl(seen["params_before"])
    assert before > 1e-3
    assert metrics["kl"] == pytest.approx(before, rel=1e-4)
    assert kl([p.detach() for p in trainer.params]) < before  # the penalty pulls the policy towards the reference


def test_advantages_are_clipped_in_the_loss():
    # At the first micro-batch every ratio is 1, so the loss is -mean(clamp(A, -0.5, 0.5)) exactly.
    trainer = make("dancegrpo", *ONE_STEP, "advantage.clip=0.5")
    seen = observe(trainer, advantages=_fixed_advantages)
    metrics = trainer.step()
    assert metrics["loss"] == pytest.approx(-seen["adv"].clamp(-0.5, 0.5).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="adv_clip_max"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), clip_range=1e-3, adv_clip_max=0)


def _fixed_advantages(tr):
    return torch.linspace(-1.0, 2.0, len(tr))  # mean 0.5: the loss -mean(A * ratio) is far from 0


def _record_steps(trainer: GRPOTrainer) -> list[float]:
    """Gradient norm seen by each optimizer step (after clipping)."""
    norms: list[float] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.flatten() for p in trainer.params if p.grad is not None]
        norms.append(torch.cat(grads).norm().item())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return norms


def test_micro_batches_accumulate_to_the_full_batch_update():
    # One optimizer step over all transitions, once in one micro-batch and once in micro-batches of 7: the same
    # gradient (each micro-batch's loss weighted by its share), so the same weights, gradient norm and loss.
    # A large Adam eps makes the step depend on the gradient's scale.
    extra = (*ONE_STEP, "train.adam_eps=1.0e-4", "train.max_grad_norm=0")
    whole = make("flowgrpo", *extra)
    seen = observe(whole, advantages=_fixed_advantages)
    metrics = whole.step()
    parts = make("flowgrpo", *extra, "train.micro_batch=7")
    stats = parts.update(seen["transitions"], seen["adv"], seen["n_samples"], torch.Generator().manual_seed(1),
                         cond=whole.step_cond)
    assert stats.updates == 1 and stats.transitions == metrics["transitions"] == 72
    assert metrics["loss"] == pytest.approx(-0.5, abs=1e-3)
    for key in ("loss", "clip_fraction", "approx_kl", "grad_norm"):
        assert getattr(stats, key) == pytest.approx(metrics[key], rel=1e-4, abs=1e-9), key
    for p, q in zip(parts.params, whole.params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_an_optimizer_step_per_accumulation_group_with_clipped_gradients():
    # accumulate=samples: 8 samples in groups of 3 -> ceil(8 / 3) = 3 optimizer steps per rollout.
    trainer = make("dancegrpo", "train.accumulate_size=3", "train.max_grad_norm=1.0e-3")
    norms = _record_steps(trainer)
    metrics = trainer.step()
    assert metrics["updates"] == len(norms) == 3
    assert metrics["grad_norm"] > 2e-3  # the reported norm is before clipping
    assert max(norms) == pytest.approx(1e-3, rel=1e-3)
    # max_grad_norm = 0 switches clipping off; grad_norm is the mean over the optimizer steps
    trainer = make("dancegrpo", "train.accumulate_size=3", "train.max_grad_norm=0")
    norms = _record_steps(trainer)
    metrics = trainer.step()
    assert len(norms) == 3 and min(norms) > 2e-3
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / 3, rel=1e-5)
    assert metrics["kl"] == 0.0  # no KL term configured


def test_first_ratio_deviation_is_measured_before_the_update():
    # A second update on the same transitions starts from moved weights: its first micro-batch (all of them here)
    # sees ratios exp(log_prob - old_log_prob) away from 1, and reports the largest deviation.
    trainer = make("dancegrpo", *ONE_STEP)
    seen = observe(trainer, advantages=_fixed_advantages)
    assert trainer.step()["first_ratio_max_dev"] < 1e-5
    tr = seen["transitions"]
    with torch.no_grad():
        want = (torch.exp(rescore(trainer.policy, tr, trainer.step_cond, trainer.cfg.sampler.noise)[0] - tr.old_log_prob) - 1).abs().max().item()
    stats = trainer.update(tr, seen["adv"], seen["n_samples"], torch.Generator().manual_seed(0))
    assert want > 1e-4
    assert stats.first_ratio_max_dev == pytest.approx(want, rel=1e-3)


def test_an_update_without_transitions_changes_nothing():
    trainer = make("dancegrpo")
    seen = observe(trainer)
    trainer.step()
    before = [p.detach().clone() for p in trainer.params]
    none = torch.zeros(0, dtype=torch.long)
    stats = trainer.update(seen["transitions"].select(none), seen["adv"][none], 0, torch.Generator().manual_seed(0))
    assert (stats.updates, stats.transitions, stats.loss) == (0, 0, 0.0)
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params))


def test_the_optimizer_is_adamw_with_the_configured_hyperparameters():
    # Replay the gradients of every optimizer step into a fresh torch AdamW built from the config values (none of
    # them torch's defaults): the weights must match.
    trainer = make("dancegrpo", "train.lr=3.0e-4", "train.betas=[0.8,0.99]", "train.adam_eps=1.0e-5",
                   "train.weight_decay=0.1", "train.accumulate_size=3", "train.max_grad_norm=0")
    grads: list[list[torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append([p.grad.detach().clone() for p in trainer.params])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    replay = [p.detach().clone().requires_grad_(True) for p in trainer.params]
    for _ in range(2):
        trainer.step()
    assert len(grads) == 6 and trainer.iteration == 2
    reference = torch.optim.AdamW(replay, lr=3e-4, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1)
    for g in grads:
        for p, gp in zip(replay, g):
            p.grad = gp
        reference.step()
    for p, q in zip(trainer.params, replay):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("name", "option", "blocks"), [
    ("flowgrpo", "rollout.same_noise_in_group=true", 2), ("flowgrpo", "rollout.same_noise_in_group=false", 6),
    ("branchgrpo", "tree.same_noise=true", 1), ("branchgrpo", "tree.same_noise=false", 2)])
def test_initial_noise_follows_the_seed_the_iteration_and_the_sharing(name, option, blocks):
    # One prompt, so only the noise differs. Chains: 2 groups of 3, sharing one noise per group or not. Trees: 2
    # trees of 2 depth-1 nodes, all from one noise (same_noise) or one per tree. Both methods train step 0, whose
    # stored input x is the initial noise. New iterations and another train.seed draw new noise.
    def initial_noise(seed: int, steps: int = 2) -> list[torch.Tensor]:
        cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=3", f"train.seed={seed}", option],
                          method=name)
        cfg.rewards = {"brightness": 1.0}
        trainer = GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, ["zero"])
        out = []
        for _ in range(steps):
            seen = observe(trainer)
            trainer.step()
            tr = seen["transitions"]
            rows = (tr.depth == 1).nonzero().flatten()
            out.append(tr.x[rows[tr.node[rows].argsort()]].flatten(1))  # [nodes at depth 1, 16] in node order
        return out

    first, second = initial_noise(0)
    per_block = first.view(blocks, -1, first.shape[1])  # [blocks, members, 16]
    assert first.shape[0] == (6 if name == "flowgrpo" else 4)
    assert torch.equal(per_block, per_block[:, :1].expand_as(per_block))  # members of a block share the noise
    distinct = per_block[:, 0]
    assert torch.cdist(distinct, distinct).add(torch.eye(blocks)).min() > 0.1  # blocks do not
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, initial_noise(1, steps=1)[0])


def test_metrics_report_the_step():
    # mixgrpo with window.start=5: the window covers steps 5..8 at iteration 0
    trainer = make("mixgrpo", "window.start=5", "window.interval=1000")
    seen = observe(trainer)
    metrics = [trainer.step() for _ in range(2)][-1]
    total = seen["raw"][0]
    assert metrics["step"] == trainer.iteration == 2
    assert metrics["reward_mean"] == pytest.approx(total.mean().item())
    assert metrics["reward_std"] == pytest.approx(total.std().item())
    assert metrics["reward/brightness"] == pytest.approx(total.mean().item())
    assert metrics["window_start"] == 5.0
    parts = [metrics[f"seconds_{k}"] for k in ("rollout", "reward", "update")]
    assert min(parts) >= 0 and metrics["seconds_step"] == pytest.approx(sum(parts), rel=1e-6, abs=1e-9)


def test_rewards_see_the_prompt_of_each_image():
    prompts = ["a", "bbbb", "cc"]

    def prompt_length(images, names):
        return torch.tensor([float(len(n)) for n in names])

    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=4"], method="dancegrpo")
    cfg.rewards = {"length": 1.0}
    trainer = GRPOTrainer(cfg, TinyPolicy(), {"length": prompt_length}, prompts)
    seen = observe(trainer)
    trainer.step()
    step_prompts = trainer.step_prompt_ids  # the leaves' cond_index points into the step's rows
    want = torch.tensor([float(len(prompts[step_prompts[i]])) for i in seen["rollout"].leaf_cond_index.tolist()])
    assert torch.equal(seen["raw"][0], want)


def test_a_nan_reward_names_the_prompt():
    def broken(images, prompts):
        return torch.full((images.shape[0],), float("nan"))

    cfg = load_config(None, ["rollout.prompts_per_step=1", "rollout.group_size=2"], method="dancegrpo")
    cfg.rewards = {"broken": 1.0}
    trainer = GRPOTrainer(cfg, TinyPolicy(), {"broken": broken}, ["seven"])
    with pytest.raises(NonFiniteRewardError, match=r"\['broken'\] returned NaN/inf at step 1 \(e.g. for prompt 'seven'\)"):
        trainer.step()


def test_the_trainer_rejects_empty_prompts_and_frozen_policies():
    cfg = load_config(None, ["rewards={brightness: 1.0}"])
    with pytest.raises(ValueError, match="prompt list is empty"):
        GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, [])
    frozen = TinyPolicy()
    frozen.module.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GRPOTrainer(cfg, frozen, {"brightness": brightness}, ["zero"])


def test_ema_moves_towards_the_weights_by_one_minus_decay():
    # Default schedule: after every optimizer step, ema <- ema + (1 - decay) * (weights - ema).
    decay = 0.75
    trainer = make("flowgrpo", f"train.ema_decay={decay}", "train.accumulate_size=2")
    snapshots = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        snapshots.append([p.detach().clone() for p in trainer.params])
        return out

    trainer.optimizer.step = recording_step
    ema = [p.detach().clone() for p in trainer.params]
    for _ in range(2):
        trainer.step()
    assert len(snapshots) >= 4
    for weights in snapshots:
        ema = [e + (1 - decay) * (w - e) for e, w in zip(ema, weights)]
    for e, mine in zip(trainer.ema, ema):
        torch.testing.assert_close(e, mine, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(e, p) for e, p in zip(trainer.ema, trainer.params))
    # evaluation uses the EMA weights and leaves the trained weights in place
    trained = [p.detach().clone() for p in trainer.params]
    held_out = trainer.evaluate()["reward"]
    assert all(torch.equal(a, p) for a, p in zip(trained, trainer.params))
    args = (trainer.policy, trainer.cond, trainer.prompts, trainer.rewards, trainer.weights, trainer.cfg)
    with trainer.weights_swapped(trainer.ema):
        assert evaluate_policy(*args)["reward"] == held_out
    assert evaluate_policy(*args)["reward"] != held_out


def test_dpm_tail_starts_afresh_after_the_window():
    # MixGRPO-Flash*: SDE window at steps 0..3, then a compressed DPM-Solver++(2M) tail to sigma 0. The tail is a
    # function of the last sampled latent alone: no x0 history crosses the last SDE step (the reference carries it,
    # which gave the prediction at the trained step a negative weight in the image, tests/test_tail_credit.py), and
    # its 2M steps are monotone. Recompute the tail from the stored window transitions.
    trainer = make("mixgrpo-flash-star")
    seen = observe(trainer)
    trainer.step()
    plan = method.step_plan(trainer.cfg, 0)
    tr, leaves = seen["transitions"], seen["rollout"].leaves
    last = plan.trained_steps[-1]
    assert trainer.cfg.sampler.reward_image == "final"
    assert len(plan.kinds) - last - 1 >= 2 and set(plan.kinds[last + 1:]) == {"dpm"}
    rows = (tr.depth == last + 1).nonzero().flatten()
    rows = rows[tr.node[rows].argsort()]  # chain order, like the leaves
    assert rows.numel() == leaves.shape[0]
    cond = trainer.step_cond.select(tr.cond_index[rows])

    def x0(x, sigma):
        return x0_from_velocity(x, trainer.policy.velocity(x, x.new_full((x.shape[0],), sigma), cond), sigma)

    with torch.no_grad(), trainer.weights_swapped(seen["params_before"]):  # the rollout's weights
        window_x0, window_sigma = x0(tr.x[rows], plan.sigmas[last].item()), plan.sigmas[last].item()
        x, prev_x0, prev_sigma = tr.x_next[rows], None, None
        carried = x.clone()  # the reference: history from the last window step, plain 2M
        for i in range(last + 1, plan.num_steps):
            sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
            d = x0(x, sigma)
            x, prev_x0, prev_sigma = dpmpp_2m_step(x, d, sigma, sigma_next, prev_x0, prev_sigma, monotone=True), d, sigma
            d_carried = x0(carried, sigma)
            carried = dpmpp_2m_step(carried, d_carried, sigma, sigma_next, window_x0, window_sigma)
            window_x0, window_sigma = d_carried, sigma
    torch.testing.assert_close(leaves, x, rtol=1e-4, atol=1e-5)
    assert (leaves - carried).abs().max() > 1e-3  # carrying the window's history would change the samples


@pytest.mark.slow
def test_a_short_default_run_raises_the_heldout_reward():
    # The real digits default (DanceGRPO preset, digit classifier + boldness) with a smaller batch: 10 steps of
    # 4 prompts x 8 images. Measured held-out reward 0.872 -> 0.921 (seed 0) and -> 0.922 (seed 1); with the
    # advantages negated (credit.chain_advantages returning its negative) 0.872 -> 0.791 and -> 0.782.
    from flowgrove.training.setup import build_trainer

    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=8", "train.accumulate_size=16",
                             "train.steps=10"])
    trainer = build_trainer(cfg)
    before = trainer.evaluate()["reward"]
    for _ in range(cfg.train.steps):
        trainer.step()
    after = trainer.evaluate()["reward"]
    assert after > before + 0.02
