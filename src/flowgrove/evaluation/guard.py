"""The reward-hacking guard and the ``best`` criterion: pure functions over the history of periodic evaluations
(each a metrics dict of :func:`flowgrove.evaluation.evaluate.evaluate_step`, oldest first). No I/O, no torch.

Alarms (``guard.*``):

- ``judge_drop``: over the last ``window`` evaluations (or since the first, the base model's) the trained reward
  ``eval/reward`` rose while a judge ``eval/judge/<name>`` fell by more than ``judge_drop`` (absolute, in the
  judge's units).
- ``diversity``: each of the last ``window`` evaluations has ``eval/diversity_ratio`` (diversity over the base
  model's) below ``diversity_fraction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

JUDGE = "eval/judge/"


@dataclass(frozen=True)
class Alarm:
    step: int
    kind: str  # judge_drop | diversity
    message: str  # one line
    judge: str = ""  # the judge of a judge_drop alarm


def judges_of(metrics: Mapping[str, float]) -> list[str]:
    """Judge names present in an evaluation's metrics."""
    return [k[len(JUDGE):] for k in metrics if k.startswith(JUDGE)]


def _finite(*values: object) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def judge_alarms(history: Sequence[Mapping[str, float]], window: int, drop: float) -> list[Alarm]:
    """``judge_drop`` alarms of the newest evaluation against the one ``window`` evaluations earlier, else against
    the first (the base model: a hack that has settled keeps alarming). One alarm per judge at most."""
    if len(history) < 2:
        return []
    recent = _judge_alarms(history[-1], history[max(0, len(history) - 1 - window)], drop)
    named = {a.judge for a in recent}
    return recent + [a for a in _judge_alarms(history[-1], history[0], drop) if a.judge not in named]


def _judge_alarms(new: Mapping[str, float], old: Mapping[str, float], drop: float) -> list[Alarm]:
    r_new, r_old = new.get("eval/reward"), old.get("eval/reward")
    if not _finite(r_new, r_old) or r_new <= r_old:
        return []
    alarms = []
    for name in judges_of(new):
        j_new, j_old = new[JUDGE + name], old.get(JUDGE + name)
        if _finite(j_new, j_old) and j_old - j_new > drop:
            alarms.append(Alarm(int(new["step"]), "judge_drop",
                                f"trained reward rose {r_old:.3f} -> {r_new:.3f} while judge {name} fell {j_old:.3f} -> "
                                f"{j_new:.3f} (steps {int(old['step'])}-{int(new['step'])}, guard.judge_drop={drop})", name))
    return alarms


def diversity_alarm(history: Sequence[Mapping[str, float]], window: int, fraction: float) -> list[Alarm]:
    """A ``diversity`` alarm when each of the last ``window`` evaluations is below ``fraction`` of the base's."""
    recent = [h.get("eval/diversity_ratio") for h in history[-window:]]
    if len(recent) < window or not all(_finite(r) and r < fraction for r in recent):
        return []
    step = int(history[-1]["step"])
    return [Alarm(step, "diversity", f"diversity is {recent[-1]:.2f} of the base model's, below "
                                     f"guard.diversity_fraction={fraction} for {window} evaluation(s) up to step {step}")]


def check_guard(history: Sequence[Mapping[str, float]], window: int, judge_drop: float,
                diversity_fraction: float) -> list[Alarm]:
    """Every alarm the newest evaluation raises."""
    return judge_alarms(history, window, judge_drop) + diversity_alarm(history, window, diversity_fraction)


def best_score(metrics: Mapping[str, float], criterion: str) -> float:
    """The ``eval.best`` score of one evaluation (higher is better): ``judges`` = mean judge (the trained reward when
    there are none), ``reward`` = the trained reward, ``combined`` = the mean of the two. NaN for ``off``."""
    reward = float(metrics.get("eval/reward", math.nan))
    judged = [float(metrics[JUDGE + n]) for n in judges_of(metrics)]
    judge = sum(judged) / len(judged) if judged else reward
    scores = {"judges": judge, "reward": reward, "combined": (judge + reward) / 2, "off": math.nan}
    if criterion not in scores:
        raise ValueError(f"eval.best={criterion!r} is unknown; choose one of: {', '.join(scores)}")
    return scores[criterion]


def is_new_best(score: float, best: float | None) -> bool:
    """True when ``score`` is finite and beats ``best`` (None or NaN: nothing yet). Ties keep the earlier one."""
    if not _finite(score):
        return False
    return best is None or not _finite(best) or score > best
