"""From a config and an iteration number to the pieces of one GRPO iteration: the step plan, the rollout
spec, the tree and the trained-step selection. Pure functions of (config, iteration), identical on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowgrove import plans, schedules, selection, tree
from flowgrove.config import Config
from flowgrove.rollout import RolloutSpec


def base_sigmas(cfg: Config, num_steps: int | None = None) -> Tensor:
    """The sigma grid [T+1] of the configured schedule."""
    steps = num_steps or cfg.sampler.num_steps
    if cfg.sampler.schedule == "sd3":
        return schedules.sd3_sigmas(steps, cfg.sampler.shift)
    return schedules.flux_sigmas(steps, cfg.sampler.shift)


def trainable_positions(cfg: Config) -> int:
    """Transitions that can be trained: the last one is excluded when the reward image is its x0 prediction."""
    return cfg.sampler.num_steps - (cfg.sampler.reward_image == "x0_pred")


def window_positions(cfg: Config) -> int:
    """Steps a sliding SDE window may cover. With the final sample as the reward image the last two steps stay
    out of every window position, as in MixGRPO's reference (max_timesteps = T - 2): an SDE step there would leave
    its noise in the scored image. With the x0 prediction only the last (unsampled) transition is out."""
    return cfg.sampler.num_steps - (2 if cfg.sampler.reward_image == "final" else 1)


def window_schedule(cfg: Config) -> plans.WindowSchedule:
    w = cfg.window
    return plans.WindowSchedule(
        size=w.size, interval=w.interval, stride=w.stride, strategy=w.strategy, roll_back=w.roll_back, start=w.start,
        min_interval=w.min_interval, max_interval=w.max_interval, exp_k=w.exp_k, exp_threshold=w.exp_threshold,
        seed=cfg.train.seed,
    )


def split_steps(cfg: Config) -> tuple[int, ...]:
    t = cfg.tree
    if t.split_steps:
        return tree.parse_split_steps(t.split_steps, cfg.sampler.num_steps)
    return tree.split_steps_evenly(cfg.sampler.num_steps, t.split_rounds)


def step_plan(cfg: Config, iteration: int) -> plans.StepPlan:
    """Which steps are SDE, ODE or DPM-compressed and which are trained, for one iteration."""
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
                                 tail=cfg.window.tail, ratio=cfg.window.compress_ratio)
    return plans.all_sde_plan(base_sigmas(cfg))


def compressed_tree_plan(cfg: Config, sde: set[int], trained: set[int]) -> plans.StepPlan:
    """Tree-Mix with a Flash tail: after the last SDE step the ODE steps are compressed by DPM-Solver++ (2M)."""
    last_sde = max(sde)
    sigmas = schedules.compressed_tail_sigmas(cfg.sampler.num_steps, cfg.sampler.shift, last_sde, cfg.window.compress_ratio)
    kinds = tuple("sde" if i in sde else "ode" if i < last_sde else "dpm" for i in range(sigmas.numel() - 1))
    return plans.StepPlan(sigmas, kinds, tuple(i in trained for i in range(len(kinds))))


def rollout_spec(cfg: Config, plan: plans.StepPlan) -> RolloutSpec:
    branching: tuple[int, ...] = ()
    if cfg.tree.enabled:
        splits = set(split_steps(cfg))
        branching = tuple(cfg.tree.branching if i in splits else 1 for i in range(plan.num_steps))
    return RolloutSpec(plan=plan, noise=cfg.sampler.noise, noise_level=cfg.sampler.noise_level,
                       reward_image=cfg.sampler.reward_image, branching=branching,
                       split_noise_scale=cfg.tree.split_noise_scale, split_logprob_std=cfg.tree.split_logprob_std,
                       chunk_size=cfg.sampler.chunk_size)


def store_mask(cfg: Config, plan: plans.StepPlan, num_chains: int, generator: torch.Generator) -> Tensor | None:
    """Per-chain trained steps [N, S] for the all-SDE methods; None when the plan decides (windows, trees)."""
    if cfg.tree.enabled or cfg.window.enabled or cfg.train.timesteps == "plan":
        return None
    exclude_last = cfg.sampler.reward_image == "x0_pred"
    if cfg.train.timesteps == "first_k":
        k = cfg.train.first_k or trainable_positions(cfg)
        return selection.first_k_mask(num_chains, plan.num_steps, k)
    return selection.random_fraction_mask(num_chains, plan.num_steps, cfg.train.timestep_fraction, exclude_last, generator)


def forest(cfg: Config, n_trees: int, num_steps: int | None = None) -> tree.Forest:
    """The trees of one step; ``num_steps`` is the plan's (a compressed tail shortens the trees)."""
    return tree.build_forest(num_steps or cfg.sampler.num_steps, split_steps(cfg), cfg.tree.branching, n_trees)


def check_method(cfg: Config) -> None:
    """Cross-field checks that a single field's metadata cannot express."""
    if cfg.tree.enabled and cfg.window.enabled and not cfg.tree.mix:
        raise ValueError("window.enabled with tree.enabled needs tree.mix=true (BranchGRPO-Mix); or disable one of them")
    if cfg.tree.enabled and cfg.advantage.kind != "depthwise":
        raise ValueError(f"tree rollouts need advantage.kind=depthwise, got {cfg.advantage.kind!r}")
    if not cfg.tree.enabled and cfg.advantage.kind == "depthwise":
        raise ValueError("advantage.kind=depthwise needs tree.enabled=true; use group or group_global_std for chains")
    if cfg.window.enabled and cfg.window.size > window_positions(cfg):
        raise ValueError(f"window.size={cfg.window.size} exceeds the {window_positions(cfg)} steps a window may cover "
                         "(sampler.num_steps minus the last step, minus two with sampler.reward_image=final); lower it")
    if not cfg.tree.enabled and cfg.rollout.group_size < 2:
        raise ValueError("rollout.group_size must be >= 2: GRPO normalises rewards within the images of one prompt")
