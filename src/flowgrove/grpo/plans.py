"""Step plans as data, and MixGRPO's sliding SDE window over training iterations.

A `StepPlan` says, for one rollout, which sampler step is SDE, Euler ODE or DPM-Solver++, and which SDE steps are
trained. `window_start` is a pure function of (iteration, num_positions, schedule), so it is identical on every
rank and after a resume without any stored state.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from flowgrove.samplers.schedules import compressed_tail_sigmas, flux_sigmas


class StepKind:
    """String constants naming the step kinds (the keys of a sampler's step-function table)."""

    SDE = "sde"
    ODE = "ode"
    DPM = "dpm"
    ALL = (SDE, ODE, DPM)


TAILS = ("euler", "dpm")
STRATEGIES = ("progressive", "frozen", "random", "linear_decay", "exp_decay")


class Nfe(NamedTuple):
    """Model calls per final sample: in the rollout (old) and recomputed in training (new)."""

    old: float
    new: float


def _choice_error(name: str, value: str, allowed: tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{name}={value!r} is not one of {allowed}.{hint}")


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make field-wise == ambiguous
class StepPlan:
    """Which rollout step is SDE / ODE / DPM and which is trained (MixGRPO, Li et al. 2025; design.md).

    Step i goes from sigmas[i] to sigmas[i + 1]. Only SDE steps may be trained.

    Attributes:
        sigmas: [S + 1] rollout grid in [0, 1], strictly decreasing, ending at 0 (possibly compressed).
        kinds: len S, each one of StepKind.ALL.
        trained: len S, True where the step's log-prob is recomputed in training.
    """

    sigmas: Tensor  # [S + 1]
    kinds: tuple[str, ...]
    trained: tuple[bool, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "trained", tuple(bool(t) for t in self.trained))
        s = self.sigmas
        if not isinstance(s, Tensor) or s.ndim != 1 or s.numel() < 2:
            raise ValueError("sigmas must be a 1-D tensor with at least 2 points [S + 1]; got "
                             f"{type(s).__name__} of shape {getattr(s, 'shape', None)}.")
        n = s.numel() - 1
        if len(self.kinds) != n or len(self.trained) != n:
            raise ValueError(f"kinds (len {len(self.kinds)}) and trained (len {len(self.trained)}) must both have "
                             f"one entry per step: len(sigmas) - 1 = {n}.")
        for i, kind in enumerate(self.kinds):
            if kind not in StepKind.ALL:
                raise _choice_error(f"kinds[{i}]", kind, StepKind.ALL)
        bad = [i for i, (k, t) in enumerate(zip(self.kinds, self.trained)) if t and k != StepKind.SDE]
        if bad:
            raise ValueError(f"trained steps {bad} are not SDE steps; only SDE steps have a log-prob to train. "
                             "Mark them untrained or make them 'sde'.")
        if not bool((s[1:] < s[:-1]).all()):
            raise ValueError(f"sigmas must be strictly decreasing (1 = noise, 0 = data); got {s.tolist()}.")
        if float(s[-1]) != 0.0 or float(s[0]) > 1.0:
            raise ValueError(f"sigmas must lie in [0, 1] and end at 0; got first {float(s[0])}, last {float(s[-1])}.")

    @property
    def num_steps(self) -> int:
        """S, the number of rollout steps (model calls per sample for a chain)."""
        return len(self.kinds)

    @property
    def sde_steps(self) -> tuple[int, ...]:
        """Indices of the SDE steps."""
        return tuple(i for i, k in enumerate(self.kinds) if k == StepKind.SDE)

    @property
    def trained_steps(self) -> tuple[int, ...]:
        """Indices of the trained steps (a subset of sde_steps)."""
        return tuple(i for i, t in enumerate(self.trained) if t)

    @property
    def nfe_old(self) -> int:
        """Model calls per final sample in the rollout (= S for a chain)."""
        return self.num_steps

    @property
    def nfe_new(self) -> int:
        """Model calls per sample recomputed in training (= number of trained steps)."""
        return len(self.trained_steps)


def chain_nfe(plan: StepPlan) -> Nfe:
    """Model calls per final sample of a chain rollout (MixGRPO, Li et al. 2025: NFE = L + n_post)."""
    return Nfe(old=float(plan.nfe_old), new=float(plan.nfe_new))


def _check_indices(name: str, steps: Iterable[int], num_steps: int) -> set[int]:
    out = {int(i) for i in steps}
    bad = sorted(i for i in out if not 0 <= i < num_steps)
    if bad:
        raise ValueError(f"{name} {bad} out of range: step indices must be in [0, {num_steps - 1}].")
    return out


def sde_mask_plan(sigmas: Tensor, sde_steps: Iterable[int], trained: Iterable[int] | None = None) -> StepPlan:
    """SDE on a chosen step set, Euler ODE elsewhere (BranchGRPO-Mix, Li et al. 2025: SDE = window ∪ splits).

    Args:
        sigmas: [S + 1] grid, strictly decreasing, ending at 0.
        sde_steps: indices of the SDE steps.
        trained: indices of the trained steps; None trains every SDE step (BranchGRPO trains only SDE edges).

    Returns:
        The plan; `trained` must be a subset of `sde_steps`.
    """
    n = sigmas.numel() - 1
    sde = _check_indices("sde_steps", sde_steps, n)
    train = sde if trained is None else _check_indices("trained", trained, n)
    kinds = tuple(StepKind.SDE if i in sde else StepKind.ODE for i in range(n))
    return StepPlan(sigmas, kinds, tuple(i in train for i in range(n)))


def all_sde_plan(sigmas: Tensor, trained_steps: Iterable[int] | None = None) -> StepPlan:
    """Every step SDE (DanceGRPO, Xue et al. 2025; Flow-GRPO, Liu et al. 2025).

    The per-sample choice of trained steps (Dance: a random 60% of the first T-1; Flow: the first k) is made
    elsewhere, so with `trained_steps=None` every step is marked trainable; pass indices to restrict it.

    Args:
        sigmas: [S + 1] grid.
        trained_steps: indices of the trainable steps, or None for all.

    Returns:
        The plan.
    """
    n = sigmas.numel() - 1
    return sde_mask_plan(sigmas, range(n), range(n) if trained_steps is None else trained_steps)


def untrained(plan: StepPlan) -> StepPlan:
    """The same rollout with no step trained: the forward-process objectives (DiffusionNFT, AWM) train on the final
    samples, so a rollout stores no transition whatever its steps are."""
    return StepPlan(plan.sigmas, plan.kinds, (False,) * plan.num_steps)


def window_plan(num_steps: int, shift: float, start: int, size: int, tail: str = "euler",
                ratio: float = 0.4, spacing: str = "shifted") -> StepPlan:
    """SDE window [start, start + size), Euler before it, Euler or DPM-Solver++ after it (MixGRPO, Li et al. 2025).

    With tail="dpm" (MixGRPO-Flash, "post" strategy) the grid after the last window step L = start + size - 1 is
    compressed: n_post = max(int((T - L) * ratio), 2) points from sigma_{L+1} to 0, i.e. n_post - 1 "dpm" steps,
    so NFE = L + n_post (T=25, window 0..3: ratio 0.4 -> 11, ratio 0.2 -> 7). Only window steps are trained.

    Args:
        num_steps: T, the uncompressed number of steps.
        shift: time shift s of the Flux grid.
        start: first window step.
        size: window length w.
        tail: "euler" or "dpm", the solver after the window.
        ratio: compression ratio rho for tail="dpm".
        spacing: where the compressed tail's points lie (``schedules.TAIL_SPACINGS``).

    Returns:
        The plan; its sigmas equal flux_sigmas(T, shift) up to index L + 1.
    """
    if tail not in TAILS:
        raise _choice_error("tail", tail, TAILS)
    if size < 1 or start < 0 or start + size > num_steps:
        raise ValueError(f"window [start={start}, start+size={start + size}) must be non-empty and inside the "
                         f"{num_steps} steps; lower start or size.")
    last = start + size - 1
    if tail == "dpm":
        sigmas = compressed_tail_sigmas(num_steps, shift, last, ratio, spacing=spacing)
    else:
        sigmas = flux_sigmas(num_steps, shift)
    n = sigmas.numel() - 1
    after = StepKind.DPM if tail == "dpm" else StepKind.ODE
    kinds = tuple(StepKind.ODE if i < start else StepKind.SDE if i <= last else after for i in range(n))
    return StepPlan(sigmas, kinds, tuple(start <= i <= last for i in range(n)))


@dataclass(frozen=True)
class WindowSchedule:
    """How MixGRPO's SDE window moves over training iterations (MixGRPO, Li et al. 2025, GRPOTrainingStates)."""

    size: int = field(default=4, metadata={"help": "window length w (SDE and trained steps)"})
    interval: int = field(default=25, metadata={"help": "tau: iterations per position (progressive, exp_decay)"})
    stride: int = field(default=1, metadata={"help": "steps the window moves per shift; 0 freezes it"})
    strategy: str = field(default="progressive", metadata={"help": f"one of {STRATEGIES}"})
    roll_back: bool = field(default=True, metadata={"help": "past the last position: back to start (else stay)"})
    start: int = field(default=0, metadata={"help": "initial window start"})
    min_interval: int = field(default=1, metadata={"help": "linear_decay: interval at the last position"})
    max_interval: int = field(default=10, metadata={"help": "linear_decay: interval at position 0"})
    exp_k: float = field(default=0.1, metadata={"help": "exp_decay: rate k"})
    exp_threshold: int = field(default=13, metadata={"help": "exp_decay: position where the decay begins"})
    seed: int = field(default=0, metadata={"help": "random: base seed shared by all ranks"})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise _choice_error("strategy", self.strategy, STRATEGIES)
        for name in ("size", "interval", "min_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.stride < 0 or self.start < 0:
            raise ValueError(f"stride={self.stride} and start={self.start} must be >= 0 (stride 0 = frozen).")
        if self.max_interval < self.min_interval:
            raise ValueError(f"max_interval={self.max_interval} must be >= min_interval={self.min_interval}.")
        if self.exp_k < 0:
            raise ValueError(f"exp_k={self.exp_k} must be >= 0 (0 disables the decay).")


def _interval(position: int, last: int, schedule: WindowSchedule) -> int:
    """Iterations spent at a window start (linear decay adapted: p = position / last, last = T_train - size)."""
    if schedule.strategy == "linear_decay":
        p = position / last if last > 0 else 0.0
        return max(schedule.min_interval, int(schedule.max_interval * (1 - p) + schedule.min_interval * p))
    if schedule.strategy == "exp_decay":
        decay = math.exp(-schedule.exp_k * max(0, position - schedule.exp_threshold))
        return max(1, math.ceil(schedule.interval * decay))
    return schedule.interval


def window_start(iteration: int, num_positions: int, schedule: WindowSchedule) -> int:
    """Window start for a training iteration, iteration 0 first (MixGRPO, Li et al. 2025, with bugs M3/M4 fixed).

    Pure, so every rank and every resume agree: moving strategies visit start, start + stride, ... <= last for
    interval(c) iterations each (a cycle; with roll_back the cycle repeats, else the start stays at last), and
    "random" draws from a generator seeded with seed * 1_000_003 + iteration. Every transition
    0..num_positions-1 can be in the window: the largest start is last = num_positions - size.

    Args:
        iteration: training iteration, >= 0.
        num_positions: T_train, the number of stored trainable transitions (T - 1 if the last one is dropped).
        schedule: the window schedule.

    Returns:
        The start c; the window is range(c, c + size).
    """
    if iteration < 0:
        raise ValueError(f"iteration={iteration} must be >= 0.")
    last = num_positions - schedule.size
    if last < 0:
        raise ValueError(f"window size={schedule.size} exceeds num_positions={num_positions}; lower size.")
    if schedule.start > last:
        raise ValueError(f"start={schedule.start} exceeds the last window start {last} = num_positions - size.")
    if schedule.strategy == "random":
        gen = torch.Generator().manual_seed((schedule.seed * 1_000_003 + iteration) % 2**63)
        return int(torch.randint(last + 1, (), generator=gen))
    if schedule.strategy == "frozen" or schedule.stride == 0:
        return schedule.start
    positions = list(range(schedule.start, last + 1, schedule.stride))
    if not schedule.roll_back and positions[-1] != last:
        positions.append(last)  # clipped at the last start, as the reference clips at max_timesteps
    stays = [_interval(c, last, schedule) for c in positions]
    remaining = iteration % sum(stays) if schedule.roll_back else iteration  # one cycle, then back to start
    for position, stay in zip(positions, stays):
        if remaining < stay:
            return position
        remaining -= stay
    return positions[-1]  # roll_back=False: stays at the last start


def window_steps(iteration: int, num_positions: int, schedule: WindowSchedule) -> range:
    """Trained (SDE) step indices of the window at a training iteration (MixGRPO, Li et al. 2025)."""
    start = window_start(iteration, num_positions, schedule)
    return range(start, start + schedule.size)


@dataclass(frozen=True)
class RolloutSpec:
    """Everything a rollout needs besides the model, the prompts and the noise."""

    plan: StepPlan  # sigma grid, per-step kind (sde / ode / dpm) and trained flags
    noise: str  # "constant" (g = eta) or "flow" (g = a * sqrt(sigma / (1 - sigma)))
    noise_level: float
    reward_image: str = "x0_pred"  # "x0_pred" of the last step, or the "final" sample
    branching: tuple[int, ...] = ()  # children per step (1 = no split); empty = a chain
    split_noise_scale: float = 1.0
    split_logprob_std: str = "drawn"  # split children scored with the std they were drawn with, or "reference" (unscaled)
    chunk_size: int = 0  # rows per model call; 0 = everything at once
    keep_mean: bool = False  # store each trained transition's mean (the rollout policy's step, for a drift KL)

    def children(self, step: int) -> int:
        return self.branching[step] if self.branching else 1
