"""`flowgrove bench`: several presets side by side in one process, on the same task, seeds and budget.

The methods take turns step by step (the order rotates every step), so machine noise hits all of them alike.
Times are medians of per-step wall seconds (rollout + reward + update); held-out evaluations are not counted.
Overrides apply to every method (``key=value``) or to one (``method:key=value``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from flowgrove.config.load import load_config
from flowgrove.runs.metrics import plot_reward_curves
from flowgrove.training.setup import build_trainer
from flowgrove.training.trainer import GRPOTrainer


def split_overrides(methods: list[str], overrides: list[str]) -> dict[str, list[str]]:
    """``method:key=value`` goes to that method only; plain ``key=value`` to all."""
    per = {m: [] for m in methods}
    for item in overrides:
        head, _, rest = item.partition(":")
        if rest and "=" not in head:
            if head not in per:
                raise ValueError(f"override {item!r} names method {head!r}, which is not benchmarked ({', '.join(methods)})")
            per[head].append(rest)
        else:
            for m in methods:
                per[m].append(item)
    return per


def run_bench(methods: list[str], steps: int, out: Path, baseline: str, overrides: list[str], evals: int = 4) -> list[dict]:
    """Train every method for ``steps`` interleaved steps; return one row per method (also in bench.json)."""
    if baseline not in methods:
        raise ValueError(f"--baseline {baseline!r} must be one of --methods ({', '.join(methods)})")
    per = split_overrides(methods, overrides)
    trainers: dict[str, GRPOTrainer] = {}
    for m in methods:
        trainers[m] = build_trainer(load_config(None, per[m] + [f"train.steps={steps}"], method=m))
    before = {m: t.evaluate()["reward"] for m, t in trainers.items()}
    seconds = {m: [] for m in methods}
    nfe = {m: [] for m in methods}
    curves = {m: ([0.0], [before[m]]) for m in methods}
    eval_at = {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}
    for step in range(steps):
        order = methods[step % len(methods):] + methods[: step % len(methods)]
        for m in order:
            metrics = trainers[m].step()
            seconds[m].append(metrics["seconds_step"])
            nfe[m].append((metrics["nfe_old"], metrics["nfe_new"]))
        if step + 1 in eval_at:
            for m in methods:
                curves[m][0].append(sum(seconds[m]))
                curves[m][1].append(trainers[m].evaluate()["reward"])
    rows = [_row(m, seconds[m], nfe[m], before[m], curves[m][1][-1]) for m in methods]
    base = next(r for r in rows if r["method"] == baseline)["seconds_per_step"]
    for r in rows:
        r["time_ratio"] = r["seconds_per_step"] / base
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"steps": steps, "baseline": baseline, "overrides": overrides,
                                                "device": f"cpu, {torch.get_num_threads()} threads", "rows": rows}, indent=2))
    plot_reward_curves({m: curves[m] for m in methods}, out / "reward_vs_seconds.png",
                       "training wall-clock seconds (rollout + reward + update)", "held-out reward (ODE)")
    return rows


def _row(method: str, seconds: list[float], nfe: list[tuple[float, float]], before: float, after: float) -> dict:
    return {
        "method": method,
        "nfe_old": sum(a for a, _ in nfe) / len(nfe),
        "nfe_new": sum(b for _, b in nfe) / len(nfe),
        "seconds_per_step": statistics.median(seconds),
        "heldout_reward_before": before,
        "heldout_reward_after": after,
    }


def format_table(rows: list[dict], baseline: str) -> str:
    """A text table in the style of the papers' Table 1."""
    head = f"| method | NFE old | NFE new | s/iter (median) | time vs {baseline} | held-out before | held-out after | gain |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        gain = r["heldout_reward_after"] - r["heldout_reward_before"]
        lines.append(f"| {r['method']} | {r['nfe_old']:.2f} | {r['nfe_new']:.2f} | {r['seconds_per_step']:.3f} | "
                     f"{r['time_ratio']:.2f}x | {r['heldout_reward_before']:.4f} | {r['heldout_reward_after']:.4f} | {gain:+.4f} |")
    return "\n".join(lines)


def main(args) -> None:  # noqa: ANN001
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = run_bench(methods, args.steps, Path(args.out), args.baseline, list(args.overrides))
    print(format_table(rows, args.baseline))
    print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'reward_vs_seconds.png'}")
