"""Batched rollouts: chains and trees through one loop over denoising steps.

A chain is a tree that never splits, so DanceGRPO, Flow-GRPO, MixGRPO and BranchGRPO share this code. At
every step all nodes of the current depth (all groups, all trees) go through the policy in one call (split
into ``chunk_size`` rows if set). Only the transitions that training will re-score are stored, in float32,
together with the log-prob computed on exactly the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from flowgrove.grpo.plans import RolloutSpec, StepKind, StepPlan  # noqa: F401 (RolloutSpec re-exported)
from flowgrove.policies.base import Conditioning, FlowPolicy
from flowgrove.samplers.family import StepFamily, step_family
from flowgrove.samplers.steps import noise_g, sde_type_of


@dataclass(frozen=True)
class NoiseSource:
    """The SDE noise of one rank's rows of a global batch. Every rank draws the whole batch's noise from the same
    seeded generator and keeps its rows ``[rank * B, (rank + 1) * B)``, so a sample's noise does not depend on the
    number of ranks (one process draws exactly the same numbers). One rank draws as a plain generator would."""

    generator: torch.Generator
    world: int = 1
    rank: int = 0

    def randn(self, shape: torch.Size) -> Tensor | None:
        """Standard normal noise [B, ...] for this rank's B rows (float32, on the generator's device); None on one
        rank (the step draws it from the generator itself)."""
        if self.world == 1:
            return None
        full = torch.randn((shape[0] * self.world, *shape[1:]), generator=self.generator, device=self.generator.device)
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]


class Transitions(NamedTuple):
    """Stored SDE transitions (edges), E of them; everything training needs to re-score them."""

    x: Tensor  # [E, C, H, W] model input at sigma
    x_next: Tensor  # [E, C, H, W] the sample drawn at sigma_next
    sigma: Tensor  # [E]
    sigma_next: Tensor  # [E]
    g: Tensor  # [E] diffusion coefficient of the step
    noise_scale: Tensor  # [E] split-noise multiplier the sample was drawn with
    old_log_prob: Tensor  # [E] log-prob under the rollout policy
    cond_index: Tensor  # [E] row of the conditioning batch
    depth: Tensor  # [E] depth of the child node (= step + 1)
    node: Tensor  # [E] index of the child node within its depth
    old_mean: Tensor | None = None  # [E, C, H, W] the rollout policy's transition mean (RolloutSpec.keep_mean), else None

    def select(self, index: Tensor) -> Transitions:
        return Transitions(*(t[index] if t is not None else None for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.x.shape[0]


SplitChoice = Callable[[int, Tensor, Tensor], Tensor]  # (step, x0_pred [N, ...], rows [N]) -> children per node [N]


class Rollout(NamedTuple):
    """Result of one rollout over N0 roots and N_L leaves."""

    leaves: Tensor  # [N_L, C, H, W] latents handed to the decoder and the rewards
    leaf_cond_index: Tensor  # [N_L] conditioning row of each leaf
    transitions: Transitions
    edge_log_probs: tuple[Tensor, ...]  # per step d: [N_{d+1}] log-prob of the edge into each node (0 for ODE)
    nodes_per_depth: tuple[int, ...]
    model_calls: int  # policy evaluations (rows), all nodes of all trees
    fan_out: tuple[Tensor, ...] | None = None  # per step d: [N_d] children of each node (adaptive trees), else None


def batched_velocity(policy: FlowPolicy, x: Tensor, sigma: Tensor, cond: Conditioning, chunk_size: int = 0) -> Tensor:
    """Policy velocity for many rows in chunks of at most ``chunk_size`` rows. x: [N, ...], sigma: [N]."""
    if chunk_size <= 0 or x.shape[0] <= chunk_size:
        return policy.velocity(x, sigma, cond)
    parts = []
    for start in range(0, x.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, x.shape[0]), device=x.device)
        parts.append(policy.velocity(x[rows], sigma[rows], cond.select(rows)))
    return torch.cat(parts)  # [N, ...]


def decode_batched(policy: FlowPolicy, latents: Tensor, batch: int = 0) -> Tensor:
    """``policy.decode`` in micro-batches of at most ``batch`` latents (0 = all at once). Returns images [N, 3, H', W']
    or videos [N, F, 3, H', W']."""
    if batch <= 0 or latents.shape[0] <= batch:
        return policy.decode(latents)
    return torch.cat([policy.decode(part) for part in latents.split(batch)])  # [N, 3, H', W']


def _empty_transitions(like: Tensor, keep_mean: bool = False) -> Transitions:
    flat, long = like.new_zeros(0), torch.zeros(0, dtype=torch.long, device=like.device)
    lat = like.new_zeros((0, *like.shape[1:]))
    return Transitions(lat, lat, flat, flat, flat, flat, flat, long, long, long, lat if keep_mean else None)


def _cat_transitions(parts: list[Transitions], like: Tensor, keep_mean: bool = False) -> Transitions:
    if not parts:
        return _empty_transitions(like, keep_mean)
    return Transitions(*(torch.cat(field) if field[0] is not None else None for field in zip(*parts)))


@torch.no_grad()
def rollout(policy: FlowPolicy, cond: Conditioning, cond_index: Tensor, x_init: Tensor, spec: RolloutSpec,
            generator: torch.Generator | NoiseSource, store_mask: Tensor | None = None, groups: Tensor | None = None,
            split_choice: SplitChoice | None = None) -> Rollout:
    """Sample chains or trees from ``x_init`` [N0, C, H, W] and store the trained SDE transitions.

    Args:
        policy: the velocity model.
        cond: conditioning batch; ``cond_index`` [N0] picks each root's row.
        x_init: initial noise at sigma_0.
        spec: plan, noise family, branching.
        generator: source of every SDE noise draw (seeded by the caller; a :class:`NoiseSource` for one rank).
        store_mask: optional [N0, S] bool, per-root trained steps (chains only: DanceGRPO's random subset).
        groups: optional [N0] ids of identical roots (same noise and prompt): their ODE prefix and first model
            call are computed once per group.
        split_choice: adaptive trees: the children of each node at a split step (:data:`SplitChoice`); None: K.

    Returns:
        A :class:`Rollout`; the transitions hold only steps with ``plan.trained`` (and ``store_mask``) that drew noise.
    """
    plan, family = spec.plan, step_family(policy)  # the policy's steps: rectified flow, or DDIM for diffusion models
    _check_store_mask(store_mask, spec)
    x, rows = x_init.float(), cond_index.to(x_init.device)  # [N, C, H, W], [N] conditioning row per node
    store_mask = None if store_mask is None else store_mask.to(x.device)  # masks index the device's tensors
    roots = torch.arange(x.shape[0], device=x.device)  # [N] root of each node
    x, rows, fan_out = _share_groups(x, rows, roots, groups)
    prev_x0 = prev_sigma = None
    n_nodes = x_init.shape[0]  # nodes at the current depth (groups share rows while fan_out is set)
    stored, edge_log_probs, nodes, calls, split_fans = [], [], [n_nodes], 0, {}
    for step in range(plan.num_steps):
        sigma, sigma_next = plan.sigmas[step].item(), plan.sigmas[step + 1].item()
        velocity = batched_velocity(policy, x, x.new_full((x.shape[0],), sigma), cond.select(rows), spec.chunk_size)
        velocity = velocity.float()  # [N, C, H, W]
        calls += x.shape[0]
        x0_pred = family.x0(x, velocity, sigma)  # [N, C, H, W]
        kind, k = plan.kinds[step], spec.children(step)
        if fan_out is not None and (kind == "sde" or k > 1 or step == plan.num_steps - 1):
            (x, velocity, x0_pred, rows, prev_x0), fan_out = _rows_of(fan_out, x, velocity, x0_pred, rows, prev_x0), None
        if step == plan.num_steps - 1 and spec.reward_image == "x0_pred":
            # The last transition does not change x0_pred: it is neither sampled nor trained (DanceGRPO).
            _check_split(step, "x0_pred", k)
            edges, all_nodes = (*edge_log_probs, x.new_zeros(x.shape[0])), (*nodes, x.shape[0])
            return Rollout(x0_pred, rows, _cat_transitions(stored, x, spec.keep_mean), edges, all_nodes, calls,
                           _fans(split_fans, all_nodes, split_choice is not None))
        if k > 1:
            _check_split(step, kind, k)
            fan = k if split_choice is None else split_choice(step, x0_pred, rows).to(x.device)  # int, or [N] per node
            x, velocity, x0_pred, rows, roots, prev_x0 = _children(fan, x, velocity, x0_pred, rows, roots, prev_x0)
            split_fans[step] = fan
        move = STEP_KINDS[kind](family, spec, Node(x, velocity, x0_pred, sigma, sigma_next, prev_x0, prev_sigma), k,
                                generator)
        keep = _stored_rows(plan.trained[step], store_mask, roots, step)  # only SDE steps are trained (StepPlan)
        if keep is not None and move.log_prob is not None:  # a step that drew no noise (CPS onto sigma 0) has no density
            stored.append(_transitions(x, move, rows, keep, step, sigma, sigma_next, spec.keep_mean))
        n_nodes = n_nodes if fan_out is not None else x.shape[0]  # groups share rows only until a split
        edge_log_probs.append(move.log_prob if move.log_prob is not None else x.new_zeros(n_nodes))
        nodes.append(n_nodes)
        prev_x0, prev_sigma = (None, None) if kind == StepKind.SDE else (x0_pred, sigma)  # see Node.prev_x0
        x = move.x_next
    return Rollout(x, rows, _cat_transitions(stored, x, spec.keep_mean), tuple(edge_log_probs), tuple(nodes), calls,
                   _fans(split_fans, nodes, split_choice is not None))


def _fans(split_fans: dict[int, Tensor | int], nodes: Sequence[int], adaptive: bool) -> tuple[Tensor, ...] | None:
    """Children per node at every step, [N_d] each (the splits' choices, 1 elsewhere); None unless ``adaptive``."""
    if not adaptive:
        return None
    return tuple(torch.as_tensor(split_fans.get(d, 1)).cpu().expand(n).long() for d, n in enumerate(nodes[:-1]))


def _check_store_mask(store_mask: Tensor | None, spec: RolloutSpec) -> None:
    if store_mask is not None and any(k > 1 for k in spec.branching):
        raise ValueError("store_mask selects steps per chain; tree rollouts select edges by pruning masks instead")


def _check_split(step: int, kind: str, k: int) -> None:
    if k > 1 and kind == "x0_pred":
        raise ValueError("the reward image is the last step's x0 prediction, so the last step cannot split")
    if k > 1 and kind != "sde":
        raise ValueError(f"step {step} splits into {k} children but is a {kind} step; split steps must be SDE")


def _share_groups(x: Tensor, rows: Tensor, roots: Tensor, groups: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One representative row per group of identical roots, and the index that fans them out again."""
    if groups is None:
        return x, rows, None
    unique, fan_out = torch.unique(groups, return_inverse=True)  # [U], [N0]
    member = torch.zeros_like(unique).scatter_(0, fan_out, roots)  # [U] any root of each group (all are equal)
    return x[member], rows[member], fan_out  # [U, C, H, W], [U], [N0]


def _sde(family: StepFamily, spec: RolloutSpec, x: Tensor, velocity: Tensor, sigma: float, sigma_next: float, k: int,
         generator: torch.Generator | NoiseSource):
    """One SDE step of every node; split children (k > 1) are drawn with the scaled std and scored with it, or with
    the unscaled std under ``split_logprob_std="reference"`` (BranchGRPO's convention, bug B1); the returned scale is
    the one training re-scores with."""
    g = noise_g(spec.noise, spec.noise_level, x.new_tensor(sigma), x.new_tensor(sigma_next))
    scale, kind = (spec.split_noise_scale if k > 1 else 1.0), sde_type_of(spec.noise)
    source = generator if isinstance(generator, NoiseSource) else NoiseSource(generator)
    noise = source.randn(x.shape)  # [N, ...] this rank's rows of the global draw (None: one rank)
    noise = noise.to(x.device) if noise is not None else None
    out = family.sde(x, velocity, sigma, sigma_next, g, sde_type=kind, noise_scale=scale, noise=noise,
                     generator=source.generator)
    if scale != 1.0 and spec.split_logprob_std == "reference":
        out, scale = family.sde(x, velocity, sigma, sigma_next, g, sde_type=kind, x_next=out.x_next), 1.0
    return out, float(g), scale


class Node(NamedTuple):
    """The nodes of one depth at one step: what a step kind reads."""

    x: Tensor  # [N, ...] at sigma
    velocity: Tensor  # [N, ...] float32
    x0_pred: Tensor  # [N, ...]
    sigma: float
    sigma_next: float
    # [N, ...] the previous step's x0 prediction (DPM-Solver++ 2M's history); None at step 0 and after an SDE step: the
    # history is the deterministic path's own, so the tail is a function of the sampled latent alone, as the credit of
    # the trained edges assumes (the tail's first step is first order)
    prev_x0: Tensor | None
    prev_sigma: float | None


class Move(NamedTuple):
    """One step of every node: where it lands, and for a sampled step its log-prob and the noise it was drawn with."""

    x_next: Tensor  # [N, ...] at sigma_next
    log_prob: Tensor | None  # [N]; None for a deterministic step
    g: float = 0.0  # the noise level g (training re-scores with it)
    scale: float = 1.0  # the split noise scale the std was multiplied by
    mean: Tensor | None = None  # [N, ...] the transition mean of a sampled step


def _sde_move(family: StepFamily, spec: RolloutSpec, node: Node, k: int, generator: torch.Generator | NoiseSource) -> Move:
    out, g, scale = _sde(family, spec, node.x, node.velocity, node.sigma, node.sigma_next, k, generator)
    return Move(out.x_next, out.log_prob, g, scale, out.mean)


def _ode_move(family: StepFamily, spec: RolloutSpec, node: Node, k: int, generator: torch.Generator | NoiseSource) -> Move:
    return Move(family.ode(node.x, node.velocity, node.sigma, node.sigma_next), None)


def _dpm_move(family: StepFamily, spec: RolloutSpec, node: Node, k: int, generator: torch.Generator | NoiseSource) -> Move:
    # monotone: no 2M step gives the previous prediction a negative weight in the image (a compressed tail's long steps
    # did: an update that improved the model's prediction there moved the reward image the other way)
    return Move(family.dpm(node.x, node.x0_pred, node.sigma, node.sigma_next, node.prev_x0, node.prev_sigma,
                           monotone=True), None)


# StepPlan kind -> the step of every node (a new step kind is a function here and an entry in StepKind.ALL).
STEP_KINDS: dict[str, Callable[[StepFamily, RolloutSpec, Node, int, torch.Generator | NoiseSource], Move]] = {
    StepKind.SDE: _sde_move,
    StepKind.ODE: _ode_move,
    StepKind.DPM: _dpm_move,
}


def _transitions(x: Tensor, move: Move, rows: Tensor, keep: Tensor, step: int, sigma: float,
                 sigma_next: float, keep_mean: bool = False) -> Transitions:
    """The stored record of the edges ``keep`` of one sampled step (with their means if ``keep_mean``)."""
    full = lambda value: x.new_full((keep.numel(),), float(value))  # noqa: E731
    return Transitions(x[keep], move.x_next[keep], full(sigma), full(sigma_next), full(move.g), full(move.scale),
                       move.log_prob[keep], rows[keep], torch.full_like(keep, step + 1), keep,
                       move.mean[keep] if keep_mean else None)


def _rows_of(index: Tensor, *nodes: Tensor | None) -> tuple[Tensor | None, ...]:
    """Every node tensor's rows ``index`` (a group's shared prefix fanned out to its members); None stays None."""
    return tuple(t[index] if t is not None else None for t in nodes)


def _children(k: int | Tensor, *nodes: Tensor | None) -> tuple[Tensor | None, ...]:
    """Every node's tensors repeated for its ``k`` children (an int, or [N] per node; siblings adjacent); None stays
    None."""
    return tuple(t.repeat_interleave(k, dim=0) if t is not None else None for t in nodes)


def _stored_rows(trained: bool, store_mask: Tensor | None, roots: Tensor, step: int) -> Tensor | None:
    """Indices of the nodes whose incoming edge at ``step`` is stored, or None."""
    if not trained:
        return None
    if store_mask is None:
        return torch.arange(roots.shape[0], device=roots.device)
    keep = store_mask[roots, step].nonzero().flatten()
    return keep if keep.numel() else None


def rescore_step(policy: FlowPolicy, batch: Transitions, cond: Conditioning, noise: str):
    """Re-evaluate stored transitions under the current policy with the policy's step family and the SDE type of
    the rollout's noise kind ``noise`` (``sampler.noise``): the StepOutput (log_prob [E], mean [E, ...], std [E]: the
    transition std the samples were drawn with)."""
    velocity = policy.velocity(batch.x, batch.sigma, cond.select(batch.cond_index)).float()  # [E, ...]
    return step_family(policy).sde(batch.x, velocity, batch.sigma, batch.sigma_next, batch.g,
                                   sde_type=sde_type_of(noise), noise_scale=batch.noise_scale, x_next=batch.x_next)


def rescore(policy: FlowPolicy, batch: Transitions, cond: Conditioning, noise: str) -> tuple[Tensor, Tensor]:
    """Re-evaluate stored transitions under the current policy: (log_prob [E], mean [E, ...])."""
    out = rescore_step(policy, batch, cond, noise)
    return out.log_prob, out.mean
