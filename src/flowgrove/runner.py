"""`flowgrove train`: build the pieces from a config, run the trainer, write the run directory, resume."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flowgrove import distributed
from flowgrove.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowgrove.config import Config, config_from_yaml_text, config_to_yaml
from flowgrove.metrics import MetricsLogger, plot_reward_curves, read_metrics, save_grid
from flowgrove.policies.prepare import offload_text_encoders, prepare_policy
from flowgrove.prompts import load_prompt_sets
from flowgrove.rewards import build_reward
from flowgrove.trainer import GRPOTrainer


def build_trainer(cfg: Config) -> GRPOTrainer:
    """Policy, LoRA, rewards and prompts for ``cfg``, wrapped in a trainer. Seeds the global RNG."""
    device = distributed.resolve_device(cfg.run.device)
    distributed.init_from_env(device)
    if cfg.run.threads > 0:  # torch's default (one per core) is 4-17x slower on a busy machine (README)
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.train.seed)
    policy = prepare_policy(cfg, device)
    rewards = {name: build_reward(name, device=device) for name, w in cfg.rewards.items() if float(w) != 0}
    if not rewards:
        raise ValueError("every reward weight is 0; give at least one reward a nonzero weight in `rewards`")
    data = load_prompt_sets(cfg, policy)
    trainer = GRPOTrainer(cfg, policy, rewards, data.train, data.test, data.rows)  # encodes the prompts once
    if cfg.policy.offload_text_encoders:
        offload_text_encoders(policy)
    return trainer


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


class _Stop:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step, checkpoints and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config, run_dir: Path | None = None, overwrite: bool = False) -> RunResult:
    """A fresh run into ``run_dir`` (or ``run.out``, or ``runs/<method>-<time>``)."""
    run_dir = Path(run_dir or cfg.run.out or default_run_dir(cfg))
    if latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `flowgrove train --resume {run_dir}` or pick another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return _run(cfg, run_dir, build_trainer(cfg), resumed=False)


def resume(run_dir: Path, steps: int | None = None, checkpoint: str | None = None) -> RunResult:
    """Continue a run from its latest checkpoint (optionally with a new total step count)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume (expected {run_dir}/checkpoints/latest)")
    cfg = config_from_yaml_text((ckpt / "config.yaml").read_text())
    if steps is not None:
        cfg.train.steps = steps
    trainer = build_trainer(cfg)
    load_checkpoint(trainer, ckpt)
    return _run(cfg, run_dir, trainer, resumed=True)


def _run(cfg: Config, run_dir: Path, trainer: GRPOTrainer, resumed: bool) -> RunResult:
    main = distributed.is_main()
    start = time.perf_counter()
    logger = MetricsLogger(run_dir, resume_step=trainer.iteration if resumed else None) if main else None
    before = _eval_before(trainer, run_dir, main)
    stop, config_yaml = _Stop(), config_to_yaml(cfg)
    bar = tqdm(total=cfg.train.steps, initial=trainer.iteration, disable=not (cfg.run.progress and main), unit="step")
    try:
        while trainer.iteration < cfg.train.steps and not stop.requested:
            metrics = trainer.step()
            if logger:
                logger.log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", s_per_step=f"{metrics['seconds_step']:.2f}")
            if main and (trainer.iteration % cfg.run.checkpoint_every == 0 or stop.requested):
                save_checkpoint(trainer, run_dir, config_yaml, cfg.run.keep_checkpoints)
    finally:
        bar.close()
        stop.restore()
    if stop.requested:
        if main:
            save_checkpoint(trainer, run_dir, config_yaml, cfg.run.keep_checkpoints)
        raise SystemExit(f"stopped by signal after step {trainer.iteration}; resume with `flowgrove train --resume {run_dir}`")
    if main:
        save_checkpoint(trainer, run_dir, config_yaml, cfg.run.keep_checkpoints)
    summary = _finish(cfg, run_dir, trainer, before, time.perf_counter() - start) if main else {}
    if logger:
        logger.close()
    return RunResult(run_dir, summary)


def _eval_before(trainer: GRPOTrainer, run_dir: Path, main: bool) -> dict:
    """Held-out reward of the initial policy; computed once per run and kept on disk for resumes."""
    path = run_dir / "eval_before.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = trainer.evaluate()
    if main:
        save_grid(result.images, run_dir / "samples_before.png", columns=trainer.cfg.eval.samples_per_prompt)
        path.write_text(json.dumps(dict(result)))
    return dict(result)


def _finish(cfg: Config, run_dir: Path, trainer: GRPOTrainer, before: dict, wall: float) -> dict:
    after = trainer.evaluate()
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
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


