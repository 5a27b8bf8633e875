"""`flowgrove train`: build the pieces from a config, run the trainer, write the run directory, resume."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from tqdm import tqdm

from flowgrove.config.load import Config, config_to_yaml
from flowgrove.config.resume import resume_overrides
from flowgrove.evaluation.evaluate import snapshot
from flowgrove.evaluation.monitor import Monitor
from flowgrove.messages import note, program
from flowgrove.parallel import distributed, faults
from flowgrove.recipes.memory import warn_if_too_big
from flowgrove.runs import rundir
from flowgrove.runs.checkpoint import (CheckpointWriteError, Choice, checkpoint_folders, load_checkpoint,
                                       remove_leftovers, save_checkpoint)
from flowgrove.runs.metrics import MetricsLogger, plot_reward_curves, read_metrics, save_grid
from flowgrove.runs.resume import resume_plan, settle_run_dir
from flowgrove.training.halts import EvalRewardFailedError
from flowgrove.training.preflight import preflight
from flowgrove.training.setup import build_trainer
from flowgrove.training.trainer import EvalResult, GRPOTrainer, RewardFailedError, TrainingHalted

T = TypeVar("T")


@dataclass
class RunResult:
    run_dir: Path | None  # None on ranks other than 0 of a fresh run with a default folder name
    summary: dict


@dataclass
class _Claim:
    run_dir: Path
    lock: rundir.RunLock
    created: bool  # the folder did not exist before this run

    def undo(self) -> None:
        """Remove what the claim wrote (``config.yaml``, and the folder when the claim created it), after a set-up
        that failed before the first step, so the fixed command starts without ``--overwrite``."""
        (self.run_dir / "config.yaml").unlink(missing_ok=True)
        if self.created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


class RunStopped(ValueError):
    """The run stopped on a fault the user can fix (a full disk, a reward server that failed) after keeping what it
    could: the message names the fault, the last checkpoint and the resume command (one line; the CLI exits with 2)."""



class _Stop:
    """SIGTERM or a first Ctrl-C set a flag: the loop finishes the current step, every rank agrees on it at the
    step's end, checkpoints and exits. A second Ctrl-C raises KeyboardInterrupt at once; the last checkpoint on
    disk stays valid. Under torchrun a Ctrl-C reaches a worker twice within milliseconds (from the terminal and
    forwarded by the agent): a second SIGINT sooner than ``SAME_PRESS`` seconds after the first is the same press."""

    SAME_PRESS = 0.3

    def __init__(self) -> None:
        self.requested = False
        self._first_sigint: float | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint >= self.SAME_PRESS:
                raise KeyboardInterrupt
            if self._first_sigint is None:
                self._first_sigint = now
                # os.write, not print: a handler may run in the middle of another write to stderr
                os.write(2, b"flowgrove: stopping after the current step and writing a checkpoint; "
                            b"press Ctrl-C again to stop at once\n")
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class _Saver:
    """Checkpoints of the run: every rank writes its shard (rank 0's run folder), each step at most once, wall
    time counted over all resumes."""

    def __init__(self, cfg: Config, run_dir: Path | None, resumed: Choice | None) -> None:
        self.run_dir, self.yaml, self.keep = run_dir, config_to_yaml(cfg), cfg.run.keep_checkpoints
        self.main = distributed.is_main()
        self.seconds_before = resumed.state.wall_seconds if resumed else 0.0
        self.start = time.perf_counter()
        self.saved_iteration = resumed.state.iteration if resumed else None
        self.saved_path = resumed.path if resumed else None

    def wall_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def __call__(self, trainer: GRPOTrainer) -> Path | None:
        if self.saved_iteration != trainer.iteration:  # the same on every rank: each calls this after each step
            self.saved_path = save_checkpoint(trainer.state(), self.run_dir, self.yaml, self.keep, self.wall_seconds())
            self.saved_iteration = trainer.iteration
        return self.saved_path


def _agreed(setup: Callable[[], T], everywhere: bool = False) -> T | None:
    """``setup()`` on rank 0 (or on every rank); when it fails anywhere, every rank stops, so none is left
    waiting in a collective. Returns None on ranks that did not run it."""
    result, error = None, None
    if everywhere or distributed.is_main():
        try:
            result = setup()
        except Exception as err:  # noqa: BLE001  (re-raised below, once every rank knows)
            error = err
    if distributed.any_rank(error is not None):
        if error is not None:
            raise error
        raise SystemExit("flowgrove: another rank could not set up the run (see its message)")
    return result


def _take_folder(run_dir: Path, ready: Callable[[], None] = lambda: None) -> rundir.RunLock:
    """Lock ``run_dir``, remove what a killed or failed run left half-written there (a note each), then
    ``ready()``; the lock is released again when any of it fails."""
    lock = rundir.RunLock(run_dir)
    try:
        if lock.stale_owner:
            note(f"{lock.path} was left by PID {lock.stale_owner}, which is no longer running; taking it over")
        removed = remove_leftovers(run_dir)
        if removed:
            note(f"removed {', '.join(map(str, removed))}: left half-written by a run that was killed or failed")
        ready()
    except BaseException:
        lock.release()
        raise
    return lock


def _claim_fresh(cfg: Config, target: str | Path | None, overwrite: bool) -> _Claim:
    """Create or check the folder of a fresh run, lock it and write its config."""
    run_dir = Path(target) if target else rundir.default_run_dir(cfg.method)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} (run.out) is a file, not a folder; give a new folder or the folder of "
                              "an earlier run")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)

    def ready() -> None:
        removed = rundir.clear_for_fresh_run(run_dir, overwrite, has_checkpoint=bool(checkpoint_folders(run_dir)))
        if removed:
            note(f"--overwrite: removed {', '.join(removed)} of an earlier run in {run_dir}")
        rundir.atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))

    return _Claim(run_dir, _take_folder(run_dir, ready), created)


def train(cfg: Config, run_dir: Path | None = None, overwrite: bool = False) -> RunResult:
    """A fresh run into ``run_dir`` (or ``run.out``, or a new ``runs/<method>-<time>-<hex>``).

    A folder that holds an earlier run is only reused with ``overwrite``, which removes every file that run wrote.
    """
    distributed.init_from_env(timeout=cfg.run.collective_timeout)
    files = _agreed(lambda: preflight(cfg), everywhere=True)  # before the run folder is claimed: a fixed command starts cleanly
    _warn_memory(cfg)
    target = run_dir or cfg.run.out or None
    claim = _agreed(lambda: _claim_fresh(cfg, target, overwrite))
    built = False
    try:
        folder = claim.run_dir if claim else (Path(target) if target else None)
        trainer = build_trainer(cfg, files)
        built = True
        return _run(cfg, folder, trainer, resumed=None, base=_base_weights(trainer))
    finally:
        if claim:
            claim.lock.release()
            if not built:  # the set-up failed (a model, a prompt the policy refuses): nothing of the run is kept
                claim.undo()


def _warn_memory(cfg: Config) -> None:
    """Rank 0, before any model loads: one note when the predicted peak exceeds the CUDA device's memory."""
    if distributed.is_main():
        warn_if_too_big(cfg, distributed.resolve_device(cfg.run.device), distributed.world_size_and_rank()[0])


def _lock_run(run_dir: Path) -> rundir.RunLock:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; pass the folder of an earlier `flowgrove train` to --resume")
    return _take_folder(run_dir)


def resume(run_dir: Path, steps: int | None = None, checkpoint: str | None = None,
           overrides: list[str] | tuple[str, ...] = ()) -> RunResult:
    """Continue a run from its newest intact checkpoint, or from ``checkpoint`` (``step_N``), optionally with a
    new total step count and ``key=value`` overrides of the keys a resume may change
    (:data:`flowgrove.config.resume.RESUME_KEYS`; others are a :class:`ConfigError`). Checkpoints newer than the one
    taken are removed: the run continues from there."""
    run_dir = Path(run_dir)
    changes = resume_overrides(list(overrides))  # before anything is touched
    distributed.init_from_env()
    lock = _agreed(lambda: _lock_run(run_dir))
    try:
        # rank 0 verifies every checksum (each shard once, not once per rank) and hands the plan to the others
        plan = distributed.from_main(_agreed(lambda: resume_plan(run_dir, checkpoint, changes)))
        if distributed.is_main():
            for line in plan.choice.notes:
                note(line)
        if steps is not None:
            plan.cfg.train.steps = steps
        _warn_memory(plan.cfg)
        trainer = build_trainer(plan.cfg)
        base = _base_weights(trainer)  # before the checkpoint's weights replace the base model's
        loaded = load_checkpoint(trainer.state(), plan.choice.path, plan.choice.state)
        trainer.restore(loaded.iteration, loaded.trainer)
        if distributed.is_main():
            for line in settle_run_dir(run_dir, plan):
                note(line)
        return _run(plan.cfg, run_dir, trainer, resumed=plan.choice, base=base)
    finally:
        if lock:
            lock.release()


def _base_weights(trainer: GRPOTrainer) -> list[torch.Tensor] | None:
    """The base model's trainable weights (CPU) for the periodic evaluation's baselines; None without it."""
    return snapshot(trainer.state()) if trainer.cfg.eval.every > 0 else None


def _run(cfg: Config, run_dir: Path | None, trainer: GRPOTrainer, resumed: Choice | None,
         base: list[torch.Tensor] | None = None) -> RunResult:
    main = distributed.is_main()
    save = _Saver(cfg, run_dir, resumed)
    logger = MetricsLogger(run_dir, resume_step=trainer.iteration if resumed else None) if main else None
    try:
        before = _eval_before(trainer, run_dir, main)
        monitor = Monitor(cfg, trainer, run_dir, main, base, trainer.iteration if resumed else None,
                          logger.writer.add_scalar if logger else None, save.yaml, save.wall_seconds)
        monitor.start(trainer)
        _train_steps(cfg, trainer, logger, save, monitor)
        after = trainer.evaluate()  # on every rank: FSDP2's forward gathers the weights from all of them
        summary = _finish(cfg, run_dir, trainer, before, after, save.wall_seconds(), monitor) if main else {}
    finally:
        if logger:
            logger.close()
    return RunResult(run_dir, summary)


def _train_steps(cfg: Config, trainer: GRPOTrainer, logger: MetricsLogger | None, save: _Saver,
                 monitor: Monitor | None = None) -> Path | None:
    """Train to ``train.steps``, checkpointing after step 1, every ``run.checkpoint_every`` steps and at the end.

    Returns the final checkpoint. A signal on any rank (agreed on by all at the end of the step), or a
    :class:`TrainingHalted` from the trainer (raised before any weight changed: a NaN reward, a reward that raised),
    ends in one checkpoint of the last good state and ``SystemExit``, or :class:`RunStopped` for a reward that
    raised. A checkpoint that cannot be written (a full disk) ends in :class:`RunStopped` naming the last one that
    was. A peer that dies or hangs ends this rank within ``run.collective_timeout`` with a message naming it, without
    a checkpoint (writing one needs every rank).
    """

    resume_hint = f"resume with `{program()} train --resume {save.run_dir}`"
    stop = _Stop()
    beat = faults.start_heartbeat(faults.Context(lambda: save.saved_path, resume_hint), cfg.run.collective_timeout)
    bar = tqdm(total=cfg.train.steps, initial=trainer.iteration, disable=not (cfg.run.progress and save.main), unit="step")
    finished = False
    try:
        with faults.peers_checked(beat), _write_failures_stop(save, resume_hint):
            try:
                _steps(cfg, trainer, logger, save, monitor, stop, bar)
            except TrainingHalted as err:
                if logger and err.metrics:  # the step completed (every optimizer step of it skipped): log it
                    logger.log(err.metrics)
                raise _halted(err, _save_everywhere(save, trainer), resume_hint) from None
            path = _save_everywhere(save, trainer)
        finished = True
        if trainer.iteration < cfg.train.steps:
            raise SystemExit(f"flowgrove: stopped by signal after step {trainer.iteration}; checkpoint {_where(path)}; "
                             f"{resume_hint}")
    finally:
        bar.close()
        stop.restore()
        if beat:  # a rank that fails on its own stays silent, so the others name it; these stops every rank agreed on
            beat.stop(finished=finished or sys.exc_info()[0] in (SystemExit, RunStopped))
    return path


def _halted(err: TrainingHalted, path: Path | None, resume_hint: str) -> BaseException:
    """The exit of a halted run: :class:`RunStopped` (exit code 2) for a reward that failed, which the user can fix
    (a server that died or moved), ``SystemExit`` for the others."""
    line = f"{str(err).rstrip('.')}; the last good state is checkpoint {_where(path)}; {resume_hint}"
    if isinstance(err, RewardFailedError):
        name = err.reward or "NAME"
        return RunStopped(f"{line} (for a reward server that moved, add reward_options.{name}.url=URL to it)")
    return SystemExit(f"flowgrove: {line}")


@contextmanager
def _write_failures_stop(save: _Saver, resume_hint: str) -> Iterator[None]:
    """A checkpoint that cannot be written (every rank raises) stops the run with the last one that was and how to
    go on from it."""
    try:
        yield
    except CheckpointWriteError as err:
        raise RunStopped(f"{err}; {faults.last_checkpoint(save.saved_path)}; free disk space there (or fix what the "
                         f"error names), then {resume_hint}") from err


def _steps(cfg: Config, trainer: GRPOTrainer, logger: MetricsLogger | None, save: _Saver, monitor: Monitor | None,
           stop: _Stop, bar: tqdm) -> None:
    """The loop of :func:`_train_steps`: until ``train.steps`` or a stop request on any rank."""
    while trainer.iteration < cfg.train.steps and not distributed.any_rank(stop.requested):
        rng = torch.get_rng_state()  # as after the last completed step: its checkpoint's, should this step halt
        try:
            metrics = trainer.step()
        except TrainingHalted as err:
            if err.metrics is None:  # halted before it completed: what its rollout and rewards drew is undone
                torch.set_rng_state(rng)
            raise
        if monitor:  # periodic evaluation and guard: eval/* join this step's row; GuardStop halts
            try:
                monitor.after_step(trainer, metrics)
            except EvalRewardFailedError as err:
                halted = EvalRewardFailedError(f"{err} after step {trainer.iteration}; the step's training is kept",
                                               err.reward)
                halted.metrics = metrics  # the step completed: its row is logged and its training checkpointed
                raise halted from None
        if logger:
            logger.log(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", s_per_step=f"{metrics['seconds_step']:.2f}")
        if trainer.iteration == 1 or trainer.iteration % cfg.run.checkpoint_every == 0:
            save(trainer)


def _save_everywhere(save: _Saver, trainer: GRPOTrainer) -> Path | None:
    """The final checkpoint, then a barrier: no rank exits (which makes torchrun stop the others) before it is
    complete."""
    path = save(trainer)
    faults.barrier()
    return path


def _where(path: Path | None) -> str:
    return str(path) if path else "written by rank 0"


def _eval_before(trainer: GRPOTrainer, run_dir: Path | None, main: bool) -> dict:
    """Held-out reward of the initial policy; computed once per run and kept on disk for resumes."""
    path = run_dir / "eval_before.json" if run_dir else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    result = trainer.evaluate()
    if main:
        save_grid(result.images, run_dir / "samples_before.png", columns=trainer.cfg.eval.samples_per_prompt)
        rundir.atomic_write_text(path, json.dumps(dict(result)))
    return dict(result)


def _finish(cfg: Config, run_dir: Path, trainer: GRPOTrainer, before: dict, after: EvalResult, wall: float,
            monitor: Monitor | None = None) -> dict:
    save_grid(after.images, run_dir / "samples_after.png", columns=cfg.eval.samples_per_prompt)
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_reward_curves({"training reward (SDE rollouts)": ([r["step"] for r in rows], [r["reward_mean"] for r in rows])},
                       run_dir / "reward_curve.png", "step", "reward")
    mean = lambda key: sum(r[key] for r in rows) / max(len(rows), 1)  # noqa: E731
    summary = {
        "method": cfg.method, "steps": trainer.iteration, "wall_seconds": round(wall, 2),
        "heldout_reward_before": before["reward"], "heldout_reward_after": after["reward"],
        **{f"heldout_{k}_before": v for k, v in before.items() if k != "reward"},
        **{f"heldout_{k}_after": v for k, v in after.items() if k != "reward"},
        "nfe_old": mean("nfe_old"), "nfe_new": mean("nfe_new"),
        "seconds_per_step": mean("seconds_step"),
    }
    summary.update(monitor.summary() if monitor else {})
    rundir.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    if monitor:
        monitor.report()
    return summary
