"""What `flowgrove bench` reports: per-seed records of every method, their summaries over seeds (mean and 95 % CI)
in ``bench.json``, the ``bench.md`` table and the bands of ``reward_vs_seconds.png``. Pure: no model, no torch.

Per seed ``s`` (every method trained with ``train.seed = base + s``, so the methods are paired per seed):

- ``time_ratio`` = median step seconds of the method / median step seconds of the reference in the same seed;
- ``gain`` = final held-out reward - held-out reward before training, both scored with the reference's trained
  rewards and weights (so every method is measured on the same scale; ``own_gain`` uses the method's own);
- ``judge_gain`` = mean over the judges (rewards no method trains on) of final - before; None without judges;
- ``best`` / ``final``: the highest held-out reward over the evaluation points after step 0, and the last;
- ``rollout_share`` / ``reward_share`` / ``update_share``: the share of the method's step seconds (summed over the
  steps) spent sampling the rollout, scoring it, and in the policy update (they add up to 1);
- ``seconds_to_reference_reward``: training seconds (step seconds summed, evaluations excluded) at which the
  held-out reward first reaches the reference's final held-out reward of the same seed, linearly interpolated
  between the last evaluation point below and the first at or above it; None if it never does (``reached: k/N``).

The summaries are :func:`flowgrove.evaluation.seeds.summarize` of the per-seed values (the seeds that have one);
``*_vs_reference`` summarise the paired per-seed differences method - reference.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from flowgrove.evaluation.seeds import first_reach, summarize
from flowgrove.runs.metrics import Band

SUMMARISED = ("time_ratio", "gain", "judge_gain", "seconds_to_reference_reward", "best", "final", "before", "own_gain",
              "seconds_per_step", "nfe_old", "nfe_new", "rollout_share", "reward_share", "update_share")
PHASES = ("rollout", "reward", "update")  # a step's parts, as the trainer times them (metrics ``seconds_<phase>``)
PAIRED = ("gain", "judge_gain", "final")  # summarised also as differences to the reference in the same seed


@dataclass
class EvalPoint:
    """One held-out evaluation of one method in one seed."""

    step: int  # training steps done (0: before training)
    seconds: float  # training seconds so far: step seconds summed, evaluations excluded
    reward: float  # held-out reward under the reference's trained rewards and weights
    own_reward: float  # under the method's own trained rewards and weights
    judges: dict[str, float] = field(default_factory=dict)  # judge name -> mean score


@dataclass
class SeedRun:
    """Everything measured of one method in one seed; ``curve[0]`` is the evaluation before training."""

    method: str
    seed: int  # the train.seed it ran with
    step_seconds: list[float] = field(default_factory=list)
    nfe_old: list[float] = field(default_factory=list)
    nfe_new: list[float] = field(default_factory=list)
    curve: list[EvalPoint] = field(default_factory=list)
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)  # phase -> its seconds per step


def phase_shares(run: SeedRun) -> dict[str, float | None]:
    """``<phase>_share``: the phase's seconds summed over the steps / the step seconds summed; None if not timed."""
    total = sum(run.step_seconds)
    return {f"{p}_share": sum(run.phase_seconds[p]) / total if run.phase_seconds.get(p) and total > 0 else None
            for p in PHASES}


def judge_gain(run: SeedRun) -> float | None:
    """Mean over judges of final - before; None without judges."""
    first, last = run.curve[0].judges, run.curve[-1].judges
    return statistics.fmean(last[j] - first[j] for j in first) if first else None


def seed_values(run: SeedRun, ref: SeedRun) -> dict:
    """The per-seed numbers of ``run`` against the reference's run ``ref`` of the same seed (module docstring)."""
    if run.seed != ref.seed:
        raise ValueError(f"{run.method} seed {run.seed} compared with the reference's seed {ref.seed}")
    first, last = run.curve[0], run.curve[-1]
    seconds_per_step = statistics.median(run.step_seconds)
    return {
        "train_seed": run.seed,
        "seconds_per_step": seconds_per_step,
        "time_ratio": seconds_per_step / statistics.median(ref.step_seconds),
        "nfe_old": statistics.fmean(run.nfe_old), "nfe_new": statistics.fmean(run.nfe_new),
        "before": first.reward, "final": last.reward, "best": max(p.reward for p in run.curve[1:]),
        "gain": last.reward - first.reward, "own_gain": last.own_reward - first.own_reward,
        "judge_gain": judge_gain(run), **phase_shares(run),
        "reference_final": ref.curve[-1].reward,
        "seconds_to_reference_reward": first_reach([p.seconds for p in run.curve], [p.reward for p in run.curve],
                                                   ref.curve[-1].reward),
        "curve": [vars(p) for p in run.curve],
    }


def _summary(values: list) -> dict:
    return summarize([v for v in values if v is not None]).as_dict()


def method_summary(per_seed: list[dict], ref_per_seed: list[dict]) -> dict:
    """Mean and CI over seeds of every per-seed number, the paired differences to the reference and ``reached``."""
    out = {key: _summary([s[key] for s in per_seed]) for key in SUMMARISED}
    for key in PAIRED:
        pairs = [(s[key], r[key]) for s, r in zip(per_seed, ref_per_seed, strict=True)]
        out[f"{key}_vs_reference"] = _summary([a - b for a, b in pairs if a is not None and b is not None])
    reached = sum(s["seconds_to_reference_reward"] is not None for s in per_seed)
    out["seconds_to_reference_reward"]["reached"] = f"{reached}/{len(per_seed)}"
    out["per_seed"] = per_seed
    return out


def summarize_bench(runs: dict[str, list[SeedRun]], reference: str) -> dict[str, dict]:
    """``{method: summary}`` from ``{method: [its SeedRun per seed, in seed order]}`` (every method the same seeds)."""
    refs = runs[reference]
    per_seed = {m: [seed_values(r, ref) for r, ref in zip(rs, refs, strict=True)] for m, rs in runs.items()}
    return {m: method_summary(per_seed[m], per_seed[reference]) for m in runs}


def bands(runs: dict[str, list[SeedRun]]) -> dict[str, Band]:
    """Per method, per evaluation point: the mean over seeds of the training seconds (x) and of the held-out reward,
    with the 95 % CI of the reward over seeds as the band."""
    out = {}
    for m, rs in runs.items():
        points = list(zip(*(r.curve for r in rs)))  # [evaluation point][seed]
        xs = [statistics.fmean(p.seconds for p in at) for at in points]
        stats = [summarize([p.reward for p in at]) for at in points]
        out[m] = Band(xs, [s.mean for s in stats], [s.ci95 for s in stats])
    return out


def _pm(s: dict, fmt: str = "{:+.4f}", unit: str = "") -> str:
    if s["mean"] is None:
        return "-"
    text = fmt.format(s["mean"]) + unit
    return text if s["ci95"] is None else f"{text} ± {fmt.format(s['ci95']).lstrip('+')}{unit}"


def worse_line(methods: dict[str, dict], reference: str, seeds: int) -> str:
    """Which methods the 95 % CIs call worse than the reference: slower (time-ratio CI above 1), or a lower gain,
    judge gain or final reward (CI of the paired per-seed difference below 0)."""
    if seeds < 2:
        return "One seed: no confidence intervals, so no method is called worse than the reference (use --seeds 3 or more)."
    found = []
    for m, s in methods.items():
        if m == reference:
            continue
        why = [f"time {_pm(s['time_ratio'], '{:.2f}', 'x')}"] if _low(s["time_ratio"]) > 1 else []
        why += [f"{k} {_pm(s[k + '_vs_reference'])} vs {reference}" for k in PAIRED if _high(s[k + "_vs_reference"]) < 0]
        if why:
            found.append(f"{m} ({'; '.join(why)})")
    head = f"Worse than {reference} where the 95 % CI over {seeds} seeds says so: "
    return head + ("; ".join(found) if found else "none") + "."


def _low(s: dict) -> float:
    return s["mean"] - s["ci95"] if s["ci95"] is not None else -math.inf


def _high(s: dict) -> float:
    return s["mean"] + s["ci95"] if s["ci95"] is not None else math.inf


def format_markdown(summary: dict) -> str:
    """``bench.md``: the settings, one table row per method (mean ± 95 % CI over seeds) and the 'worse' line."""
    ref, n, methods = summary["reference"], summary["seeds"], summary["methods"]
    judges = ", ".join(summary["judges"]) or "none"
    lines = [f"# flowgrove bench: {n} seed(s) x {summary['steps']} steps, reference {ref}", "",
             (f"Held-out reward = the reference's trained rewards and weights ({summary['reward_weights']}); judges: "
              f"{judges}. Mean ± 95 % CI (t) over seeds (train.seed {summary['train_seeds']})."), "",
             (f"| method | NFE old / new | s/iter (median) | time vs {ref} | gain | judge gain | best | final | "
              f"s to {ref} final | reached | rollout / reward / update share |"), "|" + "---|" * 11]
    for m, s in methods.items():
        reach = s["seconds_to_reference_reward"]
        lines.append(f"| {m} | {s['nfe_old']['mean']:.2f} / {s['nfe_new']['mean']:.2f} | "
                     f"{_pm(s['seconds_per_step'], '{:.3f}')} | {_pm(s['time_ratio'], '{:.2f}', 'x')} | "
                     f"{_pm(s['gain'])} | {_pm(s['judge_gain'])} | {_pm(s['best'], '{:.4f}')} | "
                     f"{_pm(s['final'], '{:.4f}')} | {_pm(reach, '{:.1f}', ' s')} | {reach['reached']} | "
                     f"{' / '.join(_pm(s[p + '_share'], '{:.2f}') for p in PHASES)} |")
    return "\n".join([*lines, "", worse_line(methods, ref, n), ""])
