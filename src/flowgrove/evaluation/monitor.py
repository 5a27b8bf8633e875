"""The run's periodic evaluation, guard and ``best`` checkpoint (process and I/O layer; the numbers come from
``evaluation.py``, the decisions from ``guard.py``).

Every ``eval.every`` steps (and at step 0 and at the end) it evaluates, merges the ``eval/*`` numbers into that
step's metrics row (so they reach metrics.jsonl and TensorBoard), appends the record with its alarms to
``eval.jsonl``, saves the grid ``eval_grids/step_NNNNNN.png`` (same prompts and seeds every time; with
``eval.hybrid_steps`` also the hybrid-inference grid ``eval_grids/hybrid/step_NNNNNN.png``), keeps
``checkpoints/best`` by ``eval.best``, rebuilds ``report.html`` and, with ``guard.action=stop``, stops the run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from torch import Tensor

from flowgrove.config.load import Config
from flowgrove.evaluation import guard
from flowgrove.evaluation.evaluate import EvalRecord, build_setup, evaluate_step
from flowgrove.parallel import distributed
from flowgrove.runs.checkpoint import checkpoint_name, save_named_checkpoint
from flowgrove.runs.metrics import read_metrics, save_grid, truncate_metrics
from flowgrove.runs.rundir import BEST_FILE, EVAL_FILE, GRIDS, atomic_write_text
from flowgrove.training.trainer import GRPOTrainer, TrainingHalted

HYBRID_GRIDS, BEST = "hybrid", "best"


class GuardStop(TrainingHalted):
    """``guard.action=stop`` and an alarm: the runner checkpoints the current state and exits with the message."""


class Monitor:
    """Periodic evaluation of one run; every rank computes, rank 0 (``main``) writes."""

    def __init__(self, cfg: Config, trainer: GRPOTrainer, run_dir: Path | None, main: bool, base: list[Tensor] | None,
                 resume_step: int | None, writer: Callable[[str, float, int], None] | None = None,
                 config_yaml: str = "", wall: Callable[[], float] = lambda: 0.0):
        self.cfg, self.run_dir, self.main, self.writer = cfg, run_dir, main and run_dir is not None, writer
        self.config_yaml, self.wall = config_yaml, wall
        self.setup = build_setup(trainer.held_out(), base)
        self.history: list[dict] = []
        if run_dir is not None and resume_step is not None:
            if self.main:
                truncate_metrics(Path(run_dir) / EVAL_FILE, resume_step)
            self.history = read_metrics(Path(run_dir) / EVAL_FILE)
        scores = [guard.best_score(h, cfg.eval.best) for h in self.history]
        finite = [(s, int(h["step"])) for s, h in zip(scores, self.history) if math.isfinite(s)]
        self.best: tuple[float, int] | None = max(finite, key=lambda sv: (sv[0], -sv[1])) if finite else None

    @property
    def enabled(self) -> bool:
        return self.cfg.eval.every > 0

    def start(self, trainer: GRPOTrainer) -> None:
        """The step-0 evaluation of a fresh run (the base model), written to TensorBoard directly."""
        if self.enabled and not self.history:
            metrics = self.evaluate(trainer)
            if self.writer:
                for key, value in metrics.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        self.writer(key, value, 0)

    def after_step(self, trainer: GRPOTrainer, step_metrics: dict) -> None:
        """Evaluate when the step is due (and at ``last``); merges the numbers into ``step_metrics``."""
        last = trainer.iteration >= self.cfg.train.steps
        if self.enabled and (trainer.iteration % self.cfg.eval.every == 0 or last):
            step_metrics.update(self.evaluate(trainer, step_metrics))

    def evaluate(self, trainer: GRPOTrainer, step_metrics: dict | None = None) -> dict:
        record = evaluate_step(trainer.held_out(), self.setup, trainer.iteration)
        self.history.append(record.metrics)
        g = self.cfg.guard
        on = g.enabled and trainer.iteration > 0  # the base model's own evaluation raises nothing
        alarms = guard.check_guard(self.history, g.window, g.judge_drop, g.diversity_fraction) if on else []
        record.metrics["guard/alarms"] = float(len(alarms))
        for alarm in alarms:
            print(f"flowgrove: guard: {alarm.message}", file=sys.stderr)
        self._keep_best(trainer, record)
        if self.main:
            self._write(record, alarms)
        if g.action == "stop" and distributed.any_rank(bool(alarms)):  # every rank stops, none waits in a collective
            merged = {**(step_metrics or {}), **record.metrics}
            first = alarms[0].message if alarms else "another rank's evaluation raised an alarm"
            raise GuardStop(f"guard.action=stop after step {trainer.iteration}: {first}; "
                            f"{self._best_note()}", merged if step_metrics else None)
        return record.metrics

    def _keep_best(self, trainer: GRPOTrainer, record: EvalRecord) -> None:
        score = guard.best_score(record.metrics, self.cfg.eval.best)
        record.metrics["eval/best_score"] = score
        if not guard.is_new_best(score, self.best[0] if self.best else None):
            return
        self.best = (score, trainer.iteration)
        if distributed.any_rank(self.main):  # rank 0 has the run folder; every rank writes its shard
            save_named_checkpoint(trainer.state(), self.run_dir, BEST, self.config_yaml, self.wall())
        if self.main:
            atomic_write_text(self.run_dir / BEST_FILE, json.dumps(
                {"step": trainer.iteration, "criterion": self.cfg.eval.best, "score": score, **record.metrics}, indent=1))

    def _best_note(self) -> str:
        if not self.best:
            return "no best checkpoint"
        return f"best checkpoint: checkpoints/{BEST} (step {self.best[1]}, {self.cfg.eval.best} score {self.best[0]:.4f})"

    def _write(self, record: EvalRecord, alarms: list[guard.Alarm]) -> None:
        step = int(record.metrics["step"])
        grids = self.run_dir / GRIDS
        grids.mkdir(exist_ok=True)
        save_grid(record.images, grids / f"{checkpoint_name(step)}.png", columns=self.cfg.eval.samples_per_prompt)
        if record.hybrid_images is not None:
            (grids / HYBRID_GRIDS).mkdir(exist_ok=True)
            save_grid(record.hybrid_images, grids / HYBRID_GRIDS / f"{checkpoint_name(step)}.png",
                      columns=self.cfg.eval.samples_per_prompt)
        row = {**record.metrics, "alarms": [a.message for a in alarms]}
        with (self.run_dir / EVAL_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.report()

    def report(self) -> None:
        if self.main:
            from flowgrove.runs.report import write_report

            write_report(self.run_dir)

    def summary(self) -> dict:
        """Closing figures: the evaluations at the start, at the best checkpoint and at the end, and the alarms."""
        if not self.history:
            return {}
        pick = lambda h: {k[len("eval/"):]: v for k, v in h.items() if k.startswith("eval/")}  # noqa: E731
        best_step = self.best[1] if self.best else None
        best = next((h for h in self.history if int(h["step"]) == best_step), None)
        alarms = sum(int(h.get("guard/alarms", 0)) for h in self.history)
        return {"eval_start": {"step": int(self.history[0]["step"]), **pick(self.history[0])},
                "eval_best": {"step": best_step, **pick(best)} if best else None,
                "eval_end": {"step": int(self.history[-1]["step"]), **pick(self.history[-1])},
                "guard_alarms": alarms}
