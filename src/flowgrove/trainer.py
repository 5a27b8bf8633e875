"""The GRPO trainer: sample, score, compute advantages, update. One class for every method; a method is a
config (see ``method.py``), a model family is a policy adapter. No I/O here: metrics are returned as dicts.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from flowgrove import credit, distributed, method, selection, tree
from flowgrove.config import Config
from flowgrove.advantages import aggregate_rewards
from flowgrove.losses import ppo_clip_loss, transition_kl
from flowgrove.policies.base import Conditioning, FlowPolicy
from flowgrove.rewards.base import RewardFn
from flowgrove.rewards.parallel import score_rewards
from flowgrove.rollout import Rollout, Transitions, batched_velocity, rescore, rollout
from flowgrove.samplers.dpm_solver import sample_euler
from flowgrove.schedules import flux_sigmas


class TrainingHalted(RuntimeError):
    """The run cannot go on; the trainer still holds the last good state, which the runner checkpoints.
    ``metrics`` holds the metrics of the step that ended it, when it completed (None otherwise)."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.metrics = metrics


class NonFiniteRewardError(TrainingHalted):
    """A reward model returned NaN or inf; the step is abandoned before any weight changes."""


class NonFiniteUpdatesError(TrainingHalted):
    """Too many consecutive optimizer steps were skipped for a NaN/inf loss or gradient norm."""


@dataclass
class UpdateStats:
    loss: float = 0.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    kl: float = 0.0
    grad_norm: float = 0.0
    first_ratio_max_dev: float = 0.0  # max |ratio - 1| in the first micro-batch, before any weight change
    updates: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient norm
    transitions: int = 0


def step_generator(seed: int, iteration: int, stream: int, rank: int = 0) -> torch.Generator:
    """Generators derived from (seed, iteration, stream, rank): resuming at an iteration restores them exactly.
    Stream 0 (prompts, trained steps, shuffling) is identical on every rank; stream 1 (noise) differs per rank."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + iteration) * 7 + stream) * 65_537 + rank)


class GRPOTrainer:
    """Group-relative policy optimisation of a flow policy against weighted rewards."""

    def __init__(self, cfg: Config, policy: FlowPolicy, rewards: Mapping[str, RewardFn], prompts: Sequence[str]):
        method.check_method(cfg)
        if not prompts:
            raise ValueError("the prompt list is empty; give at least one prompt")
        self.cfg, self.policy, self.rewards, self.prompts = cfg, policy, dict(rewards), list(prompts)
        self.weights = torch.tensor([float(w) for w in rewards_weights(cfg, self.rewards)])
        self.device = torch.device(cfg.run.device)
        self.params = [p for p in policy.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.ema = [p.detach().clone() for p in self.params] if t.ema_decay > 0 else None
        self.reference = [p.detach().clone() for p in self.params] if t.kl_beta > 0 else None
        with torch.no_grad():
            self.cond = policy.encode_prompts(self.prompts).to(self.device)  # [P_all, ...] computed once
        self.iteration = 0
        self.nonfinite_streak = 0  # consecutive optimizer steps skipped for NaN/inf

    # ---- one iteration -------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One GRPO iteration. Returns its metrics; raises NonFiniteRewardError before touching the weights."""
        cfg, it = self.cfg, self.iteration
        world, rank = distributed.world_size_and_rank()
        shared = step_generator(cfg.train.seed, it, 0)
        noise = step_generator(cfg.train.seed, it, 1, rank)
        t0 = time.perf_counter()
        n = cfg.rollout.prompts_per_step  # per rank; all ranks draw the same global list and take their slice
        # without replacement within an epoch of the prompt set, reshuffled per epoch from the run's seed
        drawn = selection.epoch_draws(len(self.prompts), it, world * n, cfg.train.seed)  # [world * n]
        prompt_ids = drawn[rank * n:(rank + 1) * n]  # [P]
        plan = method.step_plan(cfg, it)
        spec = method.rollout_spec(cfg, plan)
        roots, x_init = self._roots(prompt_ids, noise)
        mask = method.store_mask(cfg, plan, roots.shape[0], shared)
        groups = None
        if not cfg.tree.enabled and cfg.rollout.same_noise_in_group:  # a group's ODE prefix is computed once
            groups = torch.arange(prompt_ids.shape[0], device=roots.device).repeat_interleave(cfg.rollout.group_size)
        ro = rollout(self.policy, self.cond, roots, x_init, spec, noise, store_mask=mask, groups=groups)
        t1 = time.perf_counter()
        raw = self.score(ro)  # [K, N_L]
        t2 = time.perf_counter()
        forest = method.forest(cfg, prompt_ids.shape[0], plan.num_steps) if cfg.tree.enabled else None
        adv = self.edge_advantages(raw, ro, forest)  # [E]
        keep = self.pruning_keep(ro, raw, forest)
        transitions, adv = ro.transitions.select(keep), adv[keep]
        n_leaves = ro.leaves.shape[0]
        stats = self.update(transitions, adv, n_leaves, shared, n_roots=roots.shape[0])
        t3 = time.perf_counter()
        self.iteration += 1
        total = weighted_total(raw, self.weights)  # [N_L]
        metrics = {
            "step": self.iteration, "reward_mean": total.mean().item(), "reward_std": total.std().item(),
            **{f"reward/{name}": raw[k].mean().item() for k, name in enumerate(self.rewards)},
            **{k: v for k, v in vars(stats).items()},
            "nfe_old": forest.nfe_per_leaf if forest else float(plan.nfe_old), "nfe_new": stats.transitions / n_leaves,
            "model_calls_per_sample": ro.model_calls / n_leaves,  # below nfe_old where groups share a prefix
            "seconds_rollout": t1 - t0, "seconds_reward": t2 - t1, "seconds_update": t3 - t2, "seconds_step": t3 - t0,
        }
        if cfg.window.enabled:
            metrics["window_start"] = float(min(plan.trained_steps, default=-1))
        if self.nonfinite_streak >= cfg.train.max_nonfinite_skips:
            raise NonFiniteUpdatesError(
                f"{self.nonfinite_streak} consecutive optimizer steps had a NaN/inf loss or gradient norm and were "
                f"skipped (train.max_nonfinite_skips={cfg.train.max_nonfinite_skips}), the last at step {self.iteration}; "
                "lower train.lr, set train.max_grad_norm, or check the rewards and the policy's dtype", metrics)
        return metrics

    def _roots(self, prompt_ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Conditioning rows [N0] and initial noise [N0, C, H, W] of the chains or tree roots."""
        cfg, shape = self.cfg, self.policy.latent_shape
        if cfg.tree.enabled:
            roots = prompt_ids
            n_noise = 1 if cfg.tree.same_noise else roots.shape[0]
            x = torch.randn((n_noise, *shape), generator=generator).expand(roots.shape[0], *shape)
        else:
            g = cfg.rollout.group_size
            roots = prompt_ids.repeat_interleave(g)
            if cfg.rollout.same_noise_in_group:
                x = torch.randn((prompt_ids.shape[0], *shape), generator=generator).repeat_interleave(g, dim=0)
            else:
                x = torch.randn((roots.shape[0], *shape), generator=generator)
        return roots.to(self.device), x.contiguous().to(self.device)

    def score(self, ro: Rollout) -> Tensor:
        """Rewards [K, N_leaves] of the decoded leaves; NaN or inf stops the step with a clear message."""
        with torch.no_grad():
            images = self.policy.decode(ro.leaves)  # [N, 3, H, W] in [0, 1]
            prompts = [self.prompts[i] for i in ro.leaf_cond_index.tolist()]
            raw = torch.stack([r.to(self.device) for r in score_rewards(self.rewards, images, prompts)])  # [K, N]
        bad = ~torch.isfinite(raw)
        if distributed.any_rank(bool(bad.any())):  # every rank raises, so no collective is left waiting
            names = [name for k, name in enumerate(self.rewards) if bad[k].any()]
            where = f" (e.g. for prompt {prompts[int(bad.any(0).nonzero()[0])]!r})" if bad.any() else " on another rank"
            raise NonFiniteRewardError(
                f"reward(s) {names} returned NaN/inf at step {self.iteration + 1}{where}; the step was "
                "skipped and no weights changed. Check the reward model and its inputs, then resume from the last checkpoint."
            )
        return raw

    def edge_advantages(self, raw: Tensor, ro: Rollout, forest: tree.Forest | None) -> Tensor:
        """Advantages [E] of the stored transitions, from rewards gathered over all ranks."""
        cfg = self.cfg
        gathered = distributed.all_gather_cat(raw.T.contiguous()).T  # [K, N_total]
        if forest is not None:
            world, _ = distributed.world_size_and_rank()
            forest = method.forest(cfg, forest.n_trees * world, forest.num_steps)  # every rank's trees
            log_probs = tuple(distributed.all_gather_cat(lp) for lp in ro.edge_log_probs)
            per_depth = credit.tree_advantages(gathered, self.weights, forest, log_probs, cfg.advantage, cfg.tree)
            local = tuple(distributed.shard_rows(a) for a in per_depth)
            return credit.edge_values(local, ro.transitions.depth, ro.transitions.node)
        group = torch.arange(gathered.shape[1], device=gathered.device) // cfg.rollout.group_size  # [N_total]
        sample_adv = distributed.shard_rows(credit.chain_advantages(gathered, self.weights, group, cfg.advantage))
        return credit.chain_edge_advantages(sample_adv, ro)

    def pruning_keep(self, ro: Rollout, raw: Tensor, forest: tree.Forest | None) -> Tensor:
        """Indices of the stored transitions that enter the backward pass (BranchGRPO pruning)."""
        tr = ro.transitions
        all_rows = torch.arange(len(tr), device=tr.depth.device)
        t = self.cfg.tree
        if forest is None or not tree.pruning_active(self.iteration, self.cfg.train.steps, t.pruning_fraction):
            return all_rows
        masks = []
        if t.depth_pruning:
            stop = t.depth_stop if t.depth_stop >= 0 else max(forest.split_steps)
            depths = tree.depth_pruned_depths(set(t.depth_pruning), self.iteration, t.depth_slide_interval or None, stop)
            masks.append(tree.depth_prune_mask(forest, depths))
        if t.width_keep:
            masks.append(tree.width_prune_mask(forest, weighted_total(raw, self.weights), t.width_keep))
        if not masks:
            return all_rows
        keep_edges = credit.edge_values(tuple(m.float() for m in tree.combine_masks(*masks)), tr.depth - 1, tr.node)
        return keep_edges.bool().nonzero().flatten()

    # ---- update --------------------------------------------------------------------------------------
    def update(self, tr: Transitions, adv: Tensor, n_samples: int, generator: torch.Generator,
               n_roots: int | None = None) -> UpdateStats:
        """PPO-clip updates over the stored transitions, shuffled; an optimizer step per accumulation group.

        A group whose loss or gradient norm is NaN/inf on any rank is skipped on every rank (no weight, optimizer
        or EMA change); ``train.max_nonfinite_skips`` consecutive skips raise :class:`NonFiniteUpdatesError`
        at the end of the step. ``n_roots`` (chains or trees on this rank) sets ``train.loss_scale=reference``.
        """
        t, stats = self.cfg.train, UpdateStats(transitions=len(tr))
        if len(tr) == 0:
            return stats
        order = torch.randperm(len(tr), generator=generator)  # [E]
        if t.accumulate == "samples":
            chunks = order.tensor_split(max(1, min(len(tr), -(-n_samples // t.accumulate_size))))
        else:
            chunks = order.split(t.accumulate_size)
        per_root = max(1, len(tr) // (n_roots or n_samples))  # N-bar: stored transitions per chain or tree
        totals: dict[str, float] = {}
        norms: list[float] = []
        for chunk in chunks:
            self.optimizer.zero_grad(set_to_none=True)
            chunk_loss = 0.0
            for rows in chunk.split(t.micro_batch):
                part = self._micro_step(tr.select(rows), adv[rows], loss_weight(t.loss_scale, rows.numel(), chunk.numel(),
                                                                                 t.accumulate_size, per_root))
                if stats.updates == 0 and stats.skipped_steps == 0 and not totals:
                    stats.first_ratio_max_dev = part.pop("ratio_dev")
                part.pop("ratio_dev", None)
                chunk_loss += part["loss"]
                for k, v in part.items():
                    totals[k] = totals.get(k, 0.0) + v * rows.numel() / len(tr)
            distributed.average_gradients(self.params)
            norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")).item()
            if distributed.any_rank(not (math.isfinite(chunk_loss) and math.isfinite(norm))):
                self.optimizer.zero_grad(set_to_none=True)  # skipped on every rank: weights, Adam and EMA untouched
                stats.skipped_steps += 1
                self.nonfinite_streak += 1
                continue
            norms.append(norm)
            self.optimizer.step()
            self.nonfinite_streak = 0
            self._ema_update(per_rollout=False)
            stats.updates += 1
        if stats.updates:
            self._ema_update(per_rollout=True)
        stats.grad_norm = sum(norms) / len(norms) if norms else float("nan")
        stats.loss, stats.clip_fraction = totals["loss"], totals["clip_fraction"]
        stats.approx_kl, stats.kl = totals["approx_kl"], totals.get("kl", 0.0)
        return stats

    def _micro_step(self, batch: Transitions, adv: Tensor, weight: float) -> dict[str, float]:
        """Forward, loss and backward of one micro-batch; ``weight`` scales its loss (see :func:`loss_weight`)."""
        t = self.cfg.train
        ref_mean = None
        if self.reference is not None:  # before the policy forward: swapping weights in place after it would
            with torch.no_grad(), self.weights_swapped(self.reference):  # corrupt the tensors autograd saved
                _, ref_mean = rescore(self.policy, batch, self.cond)
        log_prob, mean = rescore(self.policy, batch, self.cond)
        out = ppo_clip_loss(log_prob, batch.old_log_prob, adv, t.clip_range, self.cfg.advantage.clip)
        loss, logs = out.loss, {"loss": out.loss.item(), "clip_fraction": out.clip_fraction.item(),
                                "approx_kl": out.approx_kl.item(), "ratio_dev": (out.ratio - 1).abs().max().item()}
        if ref_mean is not None:
            kl = transition_kl(mean, ref_mean, kl_std(t.kl_scale, batch)).mean()
            loss = loss + t.kl_beta * kl
            logs["kl"] = kl.item()
        (loss * weight).backward()
        return logs

    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far in the run (AdamW's own count, so it survives a resume)."""
        state = self.optimizer.state.get(self.params[0], {})
        return int(state["step"]) if "step" in state else 0

    def _ema_update(self, per_rollout: bool) -> None:
        """EMA towards the weights by (1 - decay) on the schedule of ``train.ema_schedule``."""
        if self.ema is None:
            return
        decay = ema_decay(self.cfg.train.ema_schedule, self.cfg.train.ema_decay, self.optimizer_steps(), per_rollout)
        if decay is None:
            return
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p.detach(), 1 - decay)

    @contextmanager
    def weights_swapped(self, values: list[Tensor]) -> Iterator[None]:
        """Temporarily load ``values`` into the trainable parameters (reference policy, EMA evaluation)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Held-out reward: every prompt, fixed seeds, Euler ODE sampling (EMA weights when enabled)."""
        with self.weights_swapped(self.ema) if self.ema is not None else nullcontext():
            return evaluate_policy(self.policy, self.cond, self.prompts, self.rewards, self.weights, self.cfg)


class EvalResult(dict):
    """``{"reward": weighted mean, "reward/<name>": ...}`` plus ``images`` [N, 3, H, W] (attribute)."""

    images: Tensor


def rewards_weights(cfg: Config, rewards: Mapping[str, RewardFn]) -> list[float]:
    return [float(cfg.rewards[name]) for name in rewards]


def weighted_total(raw: Tensor, weights: Tensor) -> Tensor:
    """Rewards [K, N] -> the weighted sum over reward models [N], with the weights as configured."""
    return aggregate_rewards(raw, weights)


def loss_weight(scale: str, rows: int, chunk: int, accumulate_size: int, per_root: int) -> float:
    """Factor of a micro-batch's mean loss. ``mean``: its share of the accumulation group (the group's loss is the
    mean over its transitions). ``reference``: BranchGRPO's sum over the group's transitions / (G * N-bar), with
    G = ``train.accumulate_size`` and N-bar the stored transitions per chain or tree (DanceGRPO's 1/(G*K))."""
    return rows / chunk if scale == "mean" else rows / (accumulate_size * per_root)


def kl_std(scale: str, batch: Transitions) -> Tensor:
    """Std [E] in the KL term ``||dmu||^2 / 2 std^2``: the transition std (exact KL), or Flow-GRPO's ``g`` without
    sqrt(dsigma) (``reference``: the exact KL times dsigma, so the reference's beta transfers)."""
    if scale == "reference":
        return batch.g
    return batch.noise_scale * batch.g * (batch.sigma - batch.sigma_next).sqrt()


def ema_decay(schedule: str, decay: float, optimizer_steps: int, per_rollout: bool) -> float | None:
    """The EMA decay to apply now, or None. ``update``: ``decay`` after every optimizer step. ``dancegrpo``: once
    per rollout. ``flowgrpo``: min((1 + s) / (10 + s), decay) after optimizer step s when (s + 1) % 8 == 0 (once,
    not once per batch as the reference's bug F4 does)."""
    if schedule == "dancegrpo":
        return decay if per_rollout else None
    if per_rollout:
        return None
    if schedule == "flowgrpo":
        s = optimizer_steps
        return min((1 + s) / (10 + s), decay) if (s + 1) % 8 == 0 else None
    return decay


@torch.no_grad()
def ode_images(policy: FlowPolicy, cond: Conditioning, rows: Tensor, num_steps: int, shift: float, seed: int,
               chunk_size: int = 0) -> Tensor:
    """Euler ODE samples for conditioning rows [N] from noise seeded by ``seed``. Returns images [N, 3, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((rows.shape[0], *policy.latent_shape), generator=gen).to(cond.prompt_embeds.device)
    rows = rows.to(x.device)
    cond_rows = cond.select(rows)

    def velocity(z: Tensor, sigma: Tensor) -> Tensor:
        return batched_velocity(policy, z, z.new_full((z.shape[0],), float(sigma)), cond_rows, chunk_size)

    return policy.decode(sample_euler(velocity, x, flux_sigmas(num_steps, shift)))


@torch.no_grad()
def evaluate_policy(policy: FlowPolicy, cond: Conditioning, prompts: Sequence[str], rewards: Mapping[str, RewardFn],
                    weights: Tensor, cfg: Config) -> EvalResult:
    """ODE samples for every prompt (``eval.samples_per_prompt`` each, noise from ``eval.seed``) and their rewards."""
    e = cfg.eval
    rows = torch.arange(len(prompts)).repeat_interleave(e.samples_per_prompt)  # [N]
    images = ode_images(policy, cond, rows, e.num_steps, cfg.sampler.shift, e.seed, cfg.sampler.chunk_size)
    names = [prompts[i] for i in rows.tolist()]
    raw = torch.stack(score_rewards(rewards, images, names))  # [K, N], rewards in parallel threads
    result = EvalResult({"reward": weighted_total(raw, weights).mean().item()})
    result.update({f"reward/{name}": raw[k].mean().item() for k, name in enumerate(rewards)})
    result.images = images
    return result
