"""The GRPO trainer: sample, score, compute advantages, update. One class for every method; a method is a
config (see ``method.py``), a model family is a policy adapter. No I/O here: metrics are returned as dicts.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from flowgrove.config.load import Config
from flowgrove.grpo import selection
from flowgrove.grpo.advantages import aggregate_rewards
from flowgrove.grpo.plans import StepPlan
from flowgrove.grpo.losses import TrustRegion, ema_decay, kl_std, loss_weight, policy_loss, step_weights, transition_kl
from flowgrove.parallel import distributed, engine, rank_share
from flowgrove.policies.base import Conditioning, EncodedPrompts, FlowPolicy, PromptRows
from flowgrove.rewards.base import RewardFn
from flowgrove.rewards.scoring import RewardFailure, score_rewards
from flowgrove.samplers.family import step_family
from flowgrove.training import adaptive, credit, forward, method, scouts
from flowgrove.training.halts import (NonFiniteRewardError, NonFiniteUpdatesError, RewardFailedError,  # noqa: F401
                                      TrainingHalted, halt_on_bad_rewards)
from flowgrove.training.heldout import EvalResult, HeldOut, evaluate_policy, ode_images  # noqa: F401 (ode_images: re-exported)
from flowgrove.training.parts import TrainerParts, TrainingState, UpdateStats, build_parts
from flowgrove.training.rollout import NoiseSource, Rollout, Transitions, decode_batched, rescore, rescore_step, rollout


def step_generator(seed: int, iteration: int, stream: int, rank: int = 0) -> torch.Generator:
    """Generators derived from (seed, iteration, stream, rank): resuming at an iteration restores them exactly.
    Stream 0 (prompts, trained steps, shuffling) and stream 1 (the noise of the global batch, which each rank
    slices, see :class:`NoiseSource`) are identical on every rank, so no draw depends on the number of ranks."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + iteration) * 7 + stream) * 65_537 + rank)


class GRPOTrainer:
    """Group-relative policy optimisation of a flow policy against weighted rewards."""

    def __init__(self, cfg: Config, policy: FlowPolicy, rewards: Mapping[str, RewardFn], prompts: Sequence[str],
                 test_prompts: Sequence[str] | None = None, rows: PromptRows | None = None,
                 parts: TrainerParts | None = None):
        """``prompts`` train, ``test_prompts`` (default: the same) are evaluated; ``rows`` serves the training
        prompts' conditioning by index (an ``encode-prompts`` cache), else every training prompt is encoded once.
        ``parts`` (device, engine, optimizer) come from the recipe (:func:`flowgrove.training.setup.build_trainer`);
        without them the trainer builds its own for ``cfg`` (library use), checking the global batch first."""
        if not prompts:
            raise ValueError("the prompt list is empty; give at least one prompt")
        if parts is None:
            rank_share.check_global_batch(cfg, distributed.world_size_and_rank()[0])
            parts = build_parts(cfg, policy, distributed.resolve_device(cfg.run.device))
        self.cfg, self.policy, self.rewards, self.prompts = cfg, policy, dict(rewards), list(prompts)
        self.test_prompts = list(test_prompts) if test_prompts else self.prompts
        self.weights = torch.tensor([float(w) for w in rewards_weights(cfg, self.rewards)])
        self.device, self.engine, self.params, self.optimizer = parts.device, parts.engine, parts.params, parts.optimizer
        t = cfg.train
        self.ema = [p.detach().clone() for p in self.params] if t.ema_decay > 0 else None  # sharded as the weights
        self.reference = [p.detach().clone() for p in self.params] if t.kl_beta > 0 or t.tail_anchor > 0 else None
        self.mean_std = method.mean_trained_std(cfg, step_family(policy))  # train.step_weight=tempflow's normaliser
        with torch.no_grad():  # text encoders run once per prompt
            self.cond = None if rows is not None else policy.encode_prompts(self.prompts).to(self.device)  # [P_all, ...]
            same = self.test_prompts is self.prompts and self.cond is not None
            self.test_cond = self.cond if same else policy.encode_prompts(self.test_prompts).to(self.device)
        self.rows: PromptRows = rows if rows is not None else EncodedPrompts(self.cond)
        self.step_cond: Conditioning | None = None  # the last step's rows (its transitions index them)
        self.step_prompt_ids: Tensor | None = None  # [P] the prompt of each of those rows
        self.iteration = 0
        self.nonfinite_streak = 0  # consecutive optimizer steps skipped for NaN/inf

    # ---- one iteration -------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One GRPO iteration. Returns its metrics; raises NonFiniteRewardError before touching the weights."""
        cfg, it = self.cfg, self.iteration
        world, rank = distributed.world_size_and_rank()
        shared, noise = step_generator(cfg.train.seed, it, 0), step_generator(cfg.train.seed, it, 1)
        t0 = time.perf_counter()
        # the step's global prompts, without replacement within an epoch, reshuffled per epoch from the run's seed
        drawn = selection.epoch_draws(len(self.prompts), it, cfg.rollout.prompts_per_step, cfg.train.seed)  # [P_all]
        share = rank_share.rank_share(cfg, world, rank)  # this rank's contiguous part of the global batch
        prompt_ids = drawn[share.positions]  # [P] into the prompt set
        cond = self.rows.rows(prompt_ids).to(self.device)  # [P, ...]: only this step's rows reach the device
        self.step_cond, self.step_prompt_ids = cond, prompt_ids  # what this step's transitions' cond_index points into
        prompts = [self.prompts[i] for i in prompt_ids.tolist()]
        plan = method.step_plan(cfg, it)
        ro = self._rollout(plan, share, cond, prompts, noise, shared)
        t1 = time.perf_counter()
        raw = self.score(ro.leaves, ro.leaf_cond_index, prompts)  # [K, N_L]
        gathered = self._gather(raw.T, share).T  # [K, N_all]: every block's leaves in order
        t2 = time.perf_counter()
        forest = method.forest(cfg, share.size, plan.num_steps, ro.fan_out) if cfg.tree.enabled else None
        if cfg.train.objective == "grpo":
            adv = credit.edge_advantages(cfg, self.weights, gathered, ro, forest, share, self._gather)  # [E]
            keep = credit.pruning_keep(cfg, it, ro.transitions, weighted_total(raw.cpu(), self.weights), forest)  # by this rank's leaves' total
            if share.span > 1:  # a tree's ranks all rolled it out; each trains its share of the kept transitions
                keep = keep[rank_share.member_rows(keep.numel(), share).to(keep.device)]
            batch, adv = ro.transitions.select(keep), adv[keep]
        else:  # a forward objective: this rank's final samples noised at grid times, each with its sample's advantage
            batch = forward.step_rows(cfg, self.policy, cond, ro, share, shared, noise)
            adv = credit.block_chain_advantages(gathered, self.weights, cfg, share).to(batch.x0.device)[batch.sample]
        anchor = None if self.reference is None else forward.anchor_rows(
            cfg, self.policy, cond, ro, plan, NoiseSource(step_generator(cfg.train.seed, it, 2), share.parts, share.part),
            self.weights_swapped(self.reference))  # train.tail_anchor's rows, from their own stream
        n_leaves = ro.leaves.shape[0]
        stats = self.update(batch, adv, n_leaves, shared, n_roots=share.size / share.span, cond=cond, anchor=anchor)
        t3 = time.perf_counter()
        self.iteration += 1
        total_all = weighted_total(gathered, self.weights)  # [N_all]: the metrics do not depend on the world size
        metrics = {
            "step": self.iteration, "reward_mean": total_all.mean().item(), "reward_std": total_all.std().item(),
            **{f"reward/{name}": gathered[k].mean().item() for k, name in enumerate(self.rewards)},
            **{k: v for k, v in vars(stats).items()},
            "nfe_old": forest.nfe_per_leaf if forest else float(plan.nfe_old), "nfe_new": stats.transitions / gathered.shape[1],
            "model_calls_per_sample": ro.model_calls / n_leaves + scouts.scout_calls_per_sample(cfg),  # < nfe_old with shared prefixes; + scouts
            "seconds_rollout": t1 - t0, "seconds_reward": t2 - t1, "seconds_update": t3 - t2, "seconds_step": t3 - t0,
        }
        if cfg.tree.adaptive_calls:  # the calls an adaptive tree saved against every node splitting, per prompt (tree)
            metrics["model_calls_saved_per_prompt"] = method.forest(cfg, 1, plan.num_steps).model_calls - ro.model_calls / share.size
        if cfg.window.enabled:
            metrics["window_start"] = float(min(plan.trained_steps, default=-1))
        if self.nonfinite_streak >= cfg.train.max_nonfinite_skips:
            raise NonFiniteUpdatesError(
                f"{self.nonfinite_streak} consecutive optimizer steps had a NaN/inf loss or gradient norm and were "
                f"skipped (train.max_nonfinite_skips={cfg.train.max_nonfinite_skips}), the last at step {self.iteration}; "
                "lower train.lr, set train.max_grad_norm, or check the rewards and the policy's dtype", metrics)
        return metrics

    def _rollout(self, plan: StepPlan, share: rank_share.RankShare, cond: Conditioning, prompts: list[str],
                 noise: torch.Generator, shared: torch.Generator) -> Rollout:
        """This rank's chains or trees of one step: roots index ``cond`` (the step's rows, of ``prompts``); ``noise``
        draws the initial and SDE noise, ``shared`` the trained steps."""
        cfg = self.cfg
        spec = method.rollout_spec(cfg, plan)
        roots = share.roots.to(self.device)  # [N0_r] the step's row of each chain or tree root
        score = lambda x0, rows: weighted_total(self.score(x0, rows, prompts).cpu(), self.weights)  # noqa: E731
        if cfg.rollout.scouts > 1:  # each group's best and worst of its candidates, by a cheap ODE pass
            x_init = scouts.scout_noise(cfg, self.policy, cond, roots, share, noise, score)  # [N0_r, ...]
        else:
            x_init = method.initial_noise(cfg, self.policy.latent_shape, share, noise).to(self.device)  # [N0_r, ...]
        mask = method.store_mask(cfg, plan, share.total, shared)
        mask = mask[share.start:share.start + share.size] if mask is not None else None  # [N0_r, S] of the global mask
        groups = None
        if not cfg.tree.enabled and cfg.rollout.same_noise_in_group:  # a group's ODE prefix is computed once
            groups = share.roots.to(roots.device)
        choice = adaptive.split_choice(cfg, score, share.size, plan.num_steps) if cfg.tree.adaptive_calls else None
        return rollout(self.policy, cond, roots, x_init, spec, NoiseSource(noise, share.parts, share.part), store_mask=mask,
                       groups=groups, split_choice=choice)

    def score(self, latents: Tensor, cond_index: Tensor, cond_prompts: Sequence[str]) -> Tensor:
        """Rewards [K, N] of latents [N, ...] (the leaves, or adaptive trees' x0 predictions) decoded, ``cond_index``
        [N] indexing ``cond_prompts``. A reward that raises, or NaN or inf, on any rank stops the step on every rank
        with a clear message (:class:`RewardFailedError`, :class:`NonFiniteRewardError`), before any weight changes."""
        raw, failure = None, None
        with torch.no_grad():
            images = decode_batched(self.policy, latents, self.cfg.rollout.decode_batch)  # [N, 3, H, W] in [0, 1]
            prompts = [cond_prompts[i] for i in cond_index.tolist()]
            try:
                raw = torch.stack([r.to(self.device) for r in score_rewards(self.rewards, images, prompts)])  # [K, N]
            except RewardFailure as err:
                failure = err
        halt_on_bad_rewards(raw, failure, list(self.rewards), prompts, self.iteration + 1)
        return raw

    @staticmethod
    def _gather(rows: Tensor, share: rank_share.RankShare) -> Tensor:
        """Per-rank rows [B, ...] -> every block's rows [parts * B, ...] on the CPU, one copy of a shared block."""
        world, _ = distributed.world_size_and_rank()
        return rank_share.unique_blocks(distributed.all_gather_cat(rows.contiguous()), world, share.span).cpu()

    # ---- update --------------------------------------------------------------------------------------
    def update(self, tr: Transitions | forward.ForwardSamples, adv: Tensor, n_samples: int, generator: torch.Generator,
               n_roots: float | None = None, cond: Conditioning | None = None,
               anchor: forward.ForwardSamples | None = None) -> UpdateStats:
        """Updates over the stored transitions or a forward objective's rows, shuffled; an optimizer step per group.

        With ``train.drop_zero_advantage`` a transition whose advantage is exactly 0 enters no loss and no mean
        (each rank drops its own; a group's mean divides by its live transitions over all ranks, and a group with
        none takes no optimizer step). A group whose loss or gradient norm is NaN/inf on any rank is skipped on every
        rank (no weight, optimizer or EMA change); ``train.max_nonfinite_skips`` consecutive skips raise
        :class:`NonFiniteUpdatesError` at the end of the step. ``n_roots`` (chains or trees on this rank, a fraction
        of a tree that spans ranks) sets ``train.loss_scale=reference``; ``cond`` is the conditioning the
        transitions' ``cond_index`` points into (default: the last step's rows); ``anchor``: ``train.tail_anchor``'s rows.
        """
        cond = cond if cond is not None else self.step_cond if self.step_cond is not None else self.cond
        world, _ = distributed.world_size_and_rank()
        t, stats = self.cfg.train, UpdateStats()
        if not distributed.all_equal(len(tr)):  # equal micro-batches: a rank with fewer would leave others waiting
            raise RuntimeError(f"the ranks stored different numbers of transitions at step {self.iteration + 1} "
                               "(they must match for data-parallel updates); this is a bug, please report it")
        live = adv != 0 if t.drop_zero_advantage else torch.ones_like(adv, dtype=torch.bool)  # [E]
        size = int(distributed.max_over_ranks(float(live.sum())))  # rows every rank trains (padded with dead ones)
        if size == 0:
            stats.dropped_transitions = len(tr) * world
            return stats
        per_root = max(1, int(len(tr) // (n_roots or n_samples)))  # N-bar: stored transitions per chain or tree
        totals: dict[str, float] = {}  # the metrics' means over every pass
        norms, anchor_values = [], []
        for _ in range(t.updates_per_rollout):  # the stored transitions reused, the rollout's log-probs kept as old
            last = self._update_pass(tr, adv, live, cond, per_root, size, n_samples, generator, stats, totals, norms,
                                     anchor, anchor_values)
        stats.dropped_transitions = len(tr) * world - stats.transitions // t.updates_per_rollout
        if stats.updates:
            self._ema_update(per_rollout=True)
        stats.grad_norm = sum(norms) / len(norms) if norms else float("nan")
        totals["tail_anchor"] = sum(anchor_values) / len(anchor_values) if anchor_values else 0.0  # mean over groups
        keys = ("loss", "clip_fraction", "approx_kl", "kl", "tail_anchor")
        means = distributed.weighted_mean_over_ranks([totals.get(k, 0.0) for k in keys] + [last["clip_fraction"]],
                                                     float(live.sum()))
        stats.loss, stats.clip_fraction, stats.approx_kl, stats.kl, stats.tail_anchor, stats.last_pass_clip_fraction = means
        stats.first_ratio_max_dev = distributed.max_over_ranks(stats.first_ratio_max_dev)
        stats.last_pass_ratio_max_dev = distributed.max_over_ranks(last["ratio_max_dev"])
        return stats

    def _update_pass(self, tr: Transitions | forward.ForwardSamples, adv: Tensor, live: Tensor, cond: Conditioning,
                     per_root: int, size: int, n_samples: int, generator: torch.Generator, stats: UpdateStats,
                     totals: dict[str, float], norms: list[float], anchor: forward.ForwardSamples | None,
                     anchor_values: list[float]) -> dict[str, float]:
        """One pass over the stored rows, reshuffled into accumulation groups (an optimizer step each, each with its
        share of the ``anchor`` rows); adds to ``stats``, ``totals``, ``norms`` and ``anchor_values``, and returns the
        pass's clip fraction and largest |ratio - 1|."""
        t, (world, _) = self.cfg.train, distributed.world_size_and_rank()
        n_live_all, passes, last = int(live.sum()), t.updates_per_rollout, {"ratio_max_dev": 0.0, "clip_fraction": 0.0}
        order = selection.live_order(live.cpu(), size, generator)  # [size]
        groups = selection.accumulation_groups(order, t.accumulate, t.accumulate_size, n_samples, world)
        group_live = distributed.sum_over_ranks([float(live[g].sum()) for g in groups])  # per group, all ranks
        stats.transitions += int(sum(group_live))  # trained, over all ranks (and passes)
        for group, n_live, anchor_rows in zip(groups, group_live, forward.anchor_shares(anchor, len(groups))):
            if n_live == 0:  # on every rank: nothing to train in this group
                continue
            self.optimizer.zero_grad(set_to_none=True)
            parts = self._backward_group(tr, adv, live, cond, per_root, group, int(n_live), anchor_rows)
            for n, part in parts:  # n: the micro-batch's live rows (0 for the anchor's)
                anchor_values += [part.pop("tail_anchor")] if "tail_anchor" in part else []
                dev = part.pop("ratio_dev", None)
                if dev is not None and stats.updates == 0 and stats.skipped_steps == 0 and not totals:
                    stats.first_ratio_max_dev = dev
                last["ratio_max_dev"] = max(last["ratio_max_dev"], dev if dev is not None else 0.0)
                last["clip_fraction"] += part.get("clip_fraction", 0.0) * n / max(n_live_all, 1)  # 0 live rows: n = 0
                for k, v in part.items():
                    totals[k] = totals.get(k, 0.0) + v * n / (n_live_all * passes)
            norm = self._optimizer_step(sum(part.get("loss", 0.0) for _, part in parts), stats)
            norms += [] if norm is None else [norm]
        return last

    def _optimizer_step(self, group_loss: float, stats: UpdateStats) -> float | None:
        """Clip and step once an accumulation group's gradients are in; returns the gradient norm. None: the loss or
        the norm is NaN/inf on some rank, and the step is skipped on every rank (weights, Adam and EMA untouched)."""
        t = self.cfg.train
        norm = engine.full_value(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm or float("inf"))).item()
        if distributed.any_rank(not (math.isfinite(group_loss) and math.isfinite(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            stats.skipped_steps += 1
            self.nonfinite_streak += 1
            return None
        self.optimizer.step()
        self.nonfinite_streak = 0
        self._ema_update(per_rollout=False)
        stats.updates += 1
        return norm

    def _backward_group(self, tr: Transitions, adv: Tensor, live: Tensor, cond: Conditioning, per_root: int,
                        group: Tensor, group_live: int, anchor: forward.ForwardSamples | None = None
                        ) -> list[tuple[int, dict[str, float]]]:
        """Forward and backward of an accumulation group's micro-batches (``group``: rows of ``tr``; ``group_live``: its
        live rows on all ranks), then its ``anchor`` rows, gradients reduced at the last; each one's live rows and numbers."""
        t, (world, _) = self.cfg.train, distributed.world_size_and_rank()
        micro, parts = group.split(t.micro_batch), []
        last = len(micro) - (anchor is None)
        for i, rows in enumerate(micro):
            n = int(live[rows].sum())
            weight = loss_weight(t.loss_scale, n, group_live, world, t.accumulate_size / world, per_root)
            with self.engine.gradient_sync(i == last):  # one reduction per accumulation group
                parts.append((n, self._micro_step(tr.select(rows), adv[rows], live[rows], weight, cond)))
        if anchor is not None:  # a mean over each rank's rows; the data-parallel mean makes it the global one
            with self.engine.gradient_sync(True):
                parts.append((0, forward.anchor_backward(self.cfg, self.policy, anchor, cond, self.engine.forward)))
        return parts

    def _micro_step(self, batch: Transitions | forward.ForwardSamples, adv: Tensor, live: Tensor, weight: float,
                    cond: Conditioning) -> dict[str, float]:
        """Forward, loss and backward of one micro-batch; the loss is the mean over its ``live`` rows [E] (bool), scaled
        by ``weight`` (see :func:`loss_weight`). A micro-batch without live rows (a rank's padding) still runs its
        forward and a zero backward, so that every rank's collectives stay in step; it returns no numbers."""
        loss_of = self._transition_loss if self.cfg.train.objective == "grpo" else self._forward_loss
        loss, logs = loss_of(batch, adv, live, cond)
        (loss * weight).backward()
        return logs

    def _transition_loss(self, batch: Transitions, adv: Tensor, live: Tensor,
                         cond: Conditioning) -> tuple[Tensor, dict[str, float]]:
        """The policy loss (train.trust_region, ratio_norm, step_weight) on the re-scored log-probs of the live stored
        transitions, plus the transition KL to the reference policy."""
        t, noise = self.cfg.train, self.cfg.sampler.noise  # the noise kind (and SDE type) the transitions were drawn with
        ref_mean = None
        if self.reference is not None and t.kl_beta > 0:  # before the policy forward: swapping weights in place after it would
            with torch.no_grad(), self.weights_swapped(self.reference):  # corrupt the tensors autograd saved
                _, ref_mean = rescore(self.policy, batch, cond, noise)
        step = self.engine.forward(lambda: rescore_step(self.policy, batch, cond, noise))  # DDP sees the training forward
        if not bool(live.any()):
            return step.log_prob.sum() * 0.0, {}
        log_prob, mean, std, adv = step.log_prob[live], step.mean[live], step.std[live], adv[live]  # [E_live]
        old_mean = None if batch.old_mean is None else batch.old_mean[live]
        drift = None if old_mean is None else transition_kl(mean, old_mean, std)  # [E_live] to the rollout step
        weights = step_weights(t.step_weight, batch.sigma[live], batch.sigma_next[live], std / batch.noise_scale[live],
                               self.mean_std)
        region = TrustRegion(t.trust_region, t.clip_range, t.trust_region_kl)
        out = policy_loss(log_prob, batch.old_log_prob[live], adv, self.cfg.advantage.clip, region, ratio_norm=t.ratio_norm,
                          drift_kl=drift, std=std, weights=weights)
        loss, logs = out.loss, out.logs()
        if ref_mean is not None:
            kl = transition_kl(mean, ref_mean[live], kl_std(t.kl_scale, std, batch.g[live])).mean()  # the family's std
            loss = loss + t.kl_beta * kl
            logs["kl"] = kl.item()
        return loss, logs

    def _forward_loss(self, batch: forward.ForwardSamples, adv: Tensor, live: Tensor,
                      cond: Conditioning) -> tuple[Tensor, dict[str, float]]:
        """A forward objective's loss (:func:`flowgrove.training.forward.forward_loss`) over the live rows, through
        the engine (a rank's padding runs every row and backs a zero)."""
        rows = (live if bool(live.any()) else torch.ones_like(live)).nonzero().flatten()
        swap = self.weights_swapped(self.reference) if self.reference is not None and self.cfg.train.kl_beta > 0 else None
        loss, logs = forward.forward_loss(self.cfg, self.policy, batch.select(rows), adv[rows], cond, self.engine.forward, swap)
        return (loss, logs) if bool(live.any()) else (loss * 0.0, {})

    def held_out(self) -> HeldOut:
        """The held-out prompts, rewards and weight swaps, as :mod:`flowgrove.evaluation` reads them."""
        return HeldOut(self.cfg, self.policy, self.test_prompts, self.test_cond, self.rewards, self.weights, self.device,
                       self.ema, self.weights_swapped)

    def state(self) -> TrainingState:
        """The live tensors and counters a checkpoint saves (and loads into)."""
        return TrainingState(self.policy.module, self.optimizer, self.params, self.ema, self.reference, self.iteration,
                             {"nonfinite_streak": self.nonfinite_streak})

    def restore(self, iteration: int, counters: dict) -> None:
        """Take back the step and counters of a loaded checkpoint (its tensors were loaded in place)."""
        self.iteration = iteration
        self.nonfinite_streak = int(counters.get("nonfinite_streak", 0))

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
        self.engine.reshard()  # FSDP2: no stale unsharded copy may outlive the swap
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)
        try:
            yield
        finally:
            self.engine.reshard()
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Held-out reward: every prompt, fixed seeds, Euler ODE sampling (EMA weights when enabled), split across
        ranks, so every rank calls it. The result is kept until the weights change: a second call at the same
        weights (rank 0's summary after :class:`flowgrove.evaluation.monitor.Monitor` evaluated on every rank) samples nothing
        and enters no collective."""
        kept = getattr(self, "_held_out", None)
        if kept is not None and kept[0] == self._weights_key():
            return kept[1]
        with self.weights_swapped(self.ema) if self.ema is not None else nullcontext():
            result = evaluate_policy(self.policy, self.test_cond, self.test_prompts, self.rewards, self.weights, self.cfg)
        self._held_out = (self._weights_key(), result)
        return result

    def _weights_key(self) -> tuple:
        """Changes whenever a trainable or EMA weight is written in place (tensor version counters) or a step ends."""
        return self.iteration, tuple(p._version for p in self.params), tuple(e._version for e in self.ema or ())


def rewards_weights(cfg: Config, rewards: Mapping[str, RewardFn]) -> list[float]:
    return [float(cfg.rewards[name]) for name in rewards]


def weighted_total(raw: Tensor, weights: Tensor) -> Tensor:
    """Rewards [K, N] -> the weighted sum over reward models [N], with the weights as configured."""
    return aggregate_rewards(raw, weights)
