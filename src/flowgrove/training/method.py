"""From a config and an iteration number to the pieces of one GRPO iteration: the step plan, the rollout
spec, the tree and the trained-step selection. Pure functions of (config, iteration), identical on every rank.
The config-time checks live in :mod:`flowgrove.config.checks`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowgrove.config.checks import last_step_excluded, split_steps, trainable_positions, window_positions  # noqa: F401 (re-exported)
from flowgrove.config.schema import Config
from flowgrove.parallel.rank_share import RankShare
from flowgrove.grpo import plans, selection, tree, tree_rules
from flowgrove.samplers import schedules
from flowgrove.samplers.family import StepFamily
from flowgrove.samplers.steps import noise_g


def base_sigmas(cfg: Config, num_steps: int | None = None) -> Tensor:
    """The sigma grid [T+1] of the configured schedule."""
    steps = num_steps or cfg.sampler.num_steps
    if cfg.sampler.schedule == "sd3":
        return schedules.sd3_sigmas(steps, cfg.sampler.shift)
    return schedules.flux_sigmas(steps, cfg.sampler.shift)


def window_schedule(cfg: Config) -> plans.WindowSchedule:
    w = cfg.window
    return plans.WindowSchedule(
        size=w.size, interval=w.interval, stride=w.stride, strategy=w.strategy, roll_back=w.roll_back, start=w.start,
        min_interval=w.min_interval, max_interval=w.max_interval, exp_k=w.exp_k, exp_threshold=w.exp_threshold,
        seed=cfg.train.seed,
    )


def step_plan(cfg: Config, iteration: int) -> plans.StepPlan:
    """Which steps are SDE, ODE or DPM-compressed and which are trained, for one iteration (none under a
    forward-process objective, which trains on the final samples: see :func:`forward_mask`)."""
    plan = sampling_plan(cfg, iteration)
    return plan if cfg.train.objective == "grpo" else plans.untrained(plan)


def sampling_plan(cfg: Config, iteration: int) -> plans.StepPlan:
    """The rollout's steps and GRPO's trained ones, for one iteration."""
    last = trainable_positions(cfg)
    if cfg.tree.enabled:
        splits = set(split_steps(cfg))
        sde = set(range(cfg.sampler.num_steps))
        if cfg.tree.mix:
            sde = splits | set(plans.window_steps(iteration, window_positions(cfg), window_schedule(cfg)))
        trained = {i for i in sde if i < last}
        if cfg.tree.mix and cfg.window.tail == "dpm":
            return compressed_tree_plan(cfg, sde, trained)
        return plans.sde_mask_plan(base_sigmas(cfg), sde, trained)
    if cfg.window.enabled:
        start = plans.window_start(iteration, window_positions(cfg), window_schedule(cfg))
        return plans.window_plan(cfg.sampler.num_steps, cfg.sampler.shift, start, cfg.window.size,
                                 tail=cfg.window.tail, ratio=cfg.window.compress_ratio, spacing=cfg.window.tail_spacing)
    return plans.all_sde_plan(base_sigmas(cfg), range(last))  # the last step only where it has a log-prob


def compressed_tree_plan(cfg: Config, sde: set[int], trained: set[int]) -> plans.StepPlan:
    """Tree-Mix with a Flash tail: after the last SDE step the ODE steps are compressed by DPM-Solver++ (2M)."""
    last_sde = max(sde)
    sigmas = schedules.compressed_tail_sigmas(cfg.sampler.num_steps, cfg.sampler.shift, last_sde, cfg.window.compress_ratio,
                                              spacing=cfg.window.tail_spacing)
    kinds = tuple("sde" if i in sde else "ode" if i < last_sde else "dpm" for i in range(sigmas.numel() - 1))
    return plans.StepPlan(sigmas, kinds, tuple(i in trained for i in range(len(kinds))))


def rollout_spec(cfg: Config, plan: plans.StepPlan) -> plans.RolloutSpec:
    branching: tuple[int, ...] = ()
    if cfg.tree.enabled:
        splits = set(split_steps(cfg))
        branching = tuple(cfg.tree.branching if i in splits else 1 for i in range(plan.num_steps))
    return plans.RolloutSpec(plan=plan, noise=cfg.sampler.noise, noise_level=cfg.sampler.noise_level,
                       reward_image=cfg.sampler.reward_image, branching=branching,
                       split_noise_scale=cfg.tree.split_noise_scale, split_logprob_std=cfg.tree.split_logprob_std,
                       chunk_size=cfg.sampler.chunk_size, keep_mean=needs_rollout_mean(cfg))


def needs_rollout_mean(cfg: Config) -> bool:
    """Whether the loss reads the drift KL to the rollout policy's step, so rollouts store their transition means
    (``train.ratio_norm=grpo_guard``, ``train.trust_region=dppo``); otherwise they are not kept."""
    return cfg.train.ratio_norm != "none" or cfg.train.trust_region == "dppo"


def mean_trained_std(cfg: Config, family: StepFamily) -> float:
    """Mean transition std (split scale excluded) of the steps a run may train, on the configured grid: the first
    ``train.first_k`` under ``train.timesteps=first_k``, the window positions of a window, else every trainable
    position (TempFlow-GRPO's normaliser)."""
    n = window_positions(cfg) if cfg.window.enabled else trainable_positions(cfg)
    if cfg.train.timesteps == "first_k" and cfg.train.first_k:
        n = cfg.train.first_k
    sigmas = base_sigmas(cfg)
    sigma, sigma_next = sigmas[:n], sigmas[1:n + 1]  # [n] each
    g = noise_g(cfg.sampler.noise, cfg.sampler.noise_level, sigma, sigma_next)  # [n]
    zeros = torch.zeros(n, 1)  # a step's std depends on its sigmas and g alone, not on the latent or the model output
    return family.sde(zeros, zeros, sigma, sigma_next, g, x_next=zeros).std.mean().item()


def initial_noise(cfg: Config, latent_shape: tuple[int, ...], share: RankShare, generator: torch.Generator) -> Tensor:
    """Initial noise [N0_r, *latent_shape] of this rank's chains or tree roots: the noise of the whole global batch is
    drawn (so it does not depend on the world size) and sliced; one noise per step for trees with ``tree.same_noise``,
    one per group with ``rollout.same_noise_in_group``."""
    shape, total = latent_shape, share.total
    if cfg.tree.enabled:
        x = torch.randn((1 if cfg.tree.same_noise else total, *shape), generator=generator).expand(total, *shape)
    elif cfg.rollout.same_noise_in_group:
        x = torch.randn((cfg.rollout.prompts_per_step, *shape), generator=generator)
        x = x.repeat_interleave(cfg.rollout.group_size, dim=0)  # [N0, ...]
    else:
        x = torch.randn((total, *shape), generator=generator)
    return x[share.start:share.start + share.size].contiguous()  # [N0_r, ...]


def store_mask(cfg: Config, plan: plans.StepPlan, num_chains: int, generator: torch.Generator) -> Tensor | None:
    """Per-chain trained steps [N, S] for the all-SDE methods; None when the plan decides (windows, trees) or no
    transition is trained (forward-process objectives)."""
    if cfg.tree.enabled or cfg.window.enabled or cfg.train.timesteps == "plan" or cfg.train.objective != "grpo":
        return None
    if cfg.train.timesteps == "first_k":
        k = cfg.train.first_k or trainable_positions(cfg)
        return selection.first_k_mask(num_chains, plan.num_steps, k)
    return selection.random_fraction_mask(num_chains, plan.num_steps, cfg.train.timestep_fraction, last_step_excluded(cfg),
                                          generator)


def forward_mask(cfg: Config, num_samples: int, generator: torch.Generator) -> Tensor:
    """Forward-process objectives: the times of the sigma grid [N, T] at which each final sample is noised and trained
    (``train.timesteps``: a random ``timestep_fraction`` of the T grid points sigma_0..sigma_{T-1} per sample, as
    DiffusionNFT draws them, or the first ``first_k``, 0 = all)."""
    steps = cfg.sampler.num_steps
    if cfg.train.timesteps == "first_k":
        return selection.first_k_mask(num_samples, steps, cfg.train.first_k or steps)
    return selection.random_fraction_mask(num_samples, steps, cfg.train.timestep_fraction, False, generator)


def anchor_mask(cfg: Config, plan: plans.StepPlan, num_samples: int, generator: torch.Generator) -> Tensor | None:
    """``train.tail_anchor``: one of the plan's untrained steps per final sample [N, S] (bool), uniformly: the steps
    whose model calls shape the images but whose changes no log-prob credits (a window's ODE or DPM tail, a tree's
    ODE steps). None when the anchor is off or the plan trains every step."""
    free = torch.tensor([not trained for trained in plan.trained]).nonzero().flatten()  # [F] untrained steps
    if cfg.train.tail_anchor <= 0 or free.numel() == 0:
        return None
    pick = free[torch.randint(free.numel(), (num_samples,), generator=generator, device=generator.device).cpu()]  # [N]
    mask = torch.zeros(num_samples, plan.num_steps, dtype=torch.bool)  # [N, S]
    mask[torch.arange(num_samples), pick] = True
    return mask


def forest(cfg: Config, n_trees: int, num_steps: int | None = None,
           fan_out: tuple[Tensor, ...] | None = None) -> tree.Forest:
    """The trees of one step; ``num_steps`` is the plan's (a compressed tail shortens the trees); ``fan_out`` the
    children per node of an adaptive rollout (:attr:`flowgrove.training.rollout.Rollout.fan_out`)."""
    return tree.Forest(num_steps or cfg.sampler.num_steps, split_steps(cfg), cfg.tree.branching, n_trees, fan_out)


def adaptive_splits(cfg: Config, num_steps: int) -> dict[int, int]:
    """Adaptive trees (``tree.adaptive_calls``): split step -> nodes per tree that split there."""
    splits = split_steps(cfg)
    return dict(zip(splits, tree_rules.adaptive_split_counts(num_steps, splits, cfg.tree.branching, cfg.tree.adaptive_calls)))

