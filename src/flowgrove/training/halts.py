"""Why a training step stops the run: the halts the runner turns into one checkpoint of the last good state and a
message, and the check of a step's rewards that raises them on every rank at once."""

from __future__ import annotations

import torch
from torch import Tensor

from flowgrove.messages import UserFixable
from flowgrove.parallel import distributed
from flowgrove.rewards.scoring import RewardFailure


class TrainingHalted(RuntimeError):
    """The run cannot go on; the trainer still holds the last good state, which the runner checkpoints.
    ``metrics`` holds the metrics of the step that ended it, when it completed (None otherwise)."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.metrics = metrics


class NonFiniteRewardError(TrainingHalted):
    """A reward model returned NaN or inf; the step is abandoned before any weight changes."""


class RewardFailedError(TrainingHalted):
    """A reward raised (a server that died or answers errors) on some rank; the step is abandoned before any weight
    changes. ``reward`` names it (None on the ranks where it did not fail)."""

    def __init__(self, message: str, reward: str | None = None):
        super().__init__(message)
        self.reward = reward


class EvalRewardFailedError(RewardFailedError, UserFixable):
    """A reward raised (on some rank) while scoring the held-out evaluation. Between steps, the step before it
    completed and its training is kept: the runner adds which step (``metrics``) and checkpoints it; before the
    first step nothing has trained (exit code 2 either way)."""


def _failed(failure: RewardFailure | None) -> str:
    """What failed, for the message: this rank's reward and its error, or another rank's."""
    return f"reward {failure.name!r} failed ({failure.detail})" if failure else "a reward failed on another rank"


def halt_on_failed_eval_reward(failure: RewardFailure | None) -> None:
    """Raise :class:`EvalRewardFailedError` on every rank when a reward raised on any rank (here: ``failure``) while
    scoring a held-out evaluation: one collective, so none is left waiting in the evaluation's gather."""
    if distributed.any_rank(failure is not None):
        raise EvalRewardFailedError(f"{_failed(failure)} in the held-out evaluation", failure.name if failure else None)


class NonFiniteUpdatesError(TrainingHalted):
    """Too many consecutive optimizer steps were skipped for a NaN/inf loss or gradient norm."""


def halt_on_bad_rewards(raw: Tensor | None, failure: RewardFailure | None, names: list[str], prompts: list[str],
                        step: int) -> None:
    """Raise on every rank when a reward raised on any rank (here: ``failure``) or a score is NaN/inf (here: in
    ``raw`` [K, N], rewards ``names``, leaves' ``prompts``): one collective either way, so none is left waiting."""
    bad = ~torch.isfinite(raw) if raw is not None else None  # [K, N]
    worst = distributed.max_over_ranks(2.0 if failure is not None else float(bool(bad.any())))  # 2 raised, 1 NaN/inf
    if worst == 2.0:
        raise RewardFailedError(f"{_failed(failure)} at step {step}; the step was skipped and no weights changed",
                                failure.name if failure else None)
    if worst == 1.0:
        bad_names = [name for k, name in enumerate(names) if bad[k].any()]
        where = f" (e.g. for prompt {prompts[int(bad.any(0).nonzero()[0])]!r})" if bad.any() else " on another rank"
        raise NonFiniteRewardError(
            f"reward(s) {bad_names} returned NaN/inf at step {step}{where}; the step was "
            "skipped and no weights changed. Check the reward model and its inputs, then resume from the last checkpoint."
        )
