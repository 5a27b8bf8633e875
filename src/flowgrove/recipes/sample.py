"""`flowgrove sample` and `flowgrove eval`: load a run's latest checkpoint (or the base policy) and sample."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from flowgrove.config.load import Config, config_from_yaml_text, load_config
from flowgrove.evaluation.evaluate import hybrid_images, snapshot
from flowgrove.runs.checkpoint import latest_checkpoint, load_checkpoint
from flowgrove.runs.metrics import save_grid
from flowgrove.training import method
from flowgrove.training.setup import build_trainer
from flowgrove.training.trainer import GRPOTrainer, ode_images


def load_run(run: str | Path | None) -> GRPOTrainer:
    """A trainer holding a run's latest weights (EMA swapped in by ``evaluate``), or the base policy."""
    return load_run_and_base(run, keep_base=False)[0]


def load_run_and_base(run: str | Path | None, keep_base: bool = True) -> tuple[GRPOTrainer, list[torch.Tensor] | None]:
    """:func:`load_run` and the base model's trainable weights (CPU, taken before the checkpoint is loaded; None
    without ``keep_base``)."""
    if run is None:
        trainer = build_trainer(load_config())
        return trainer, snapshot(trainer.state()) if keep_base else None
    ckpt = latest_checkpoint(Path(run))
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no intact checkpoint (expected {run}/checkpoints/step_N); is it a run directory?")
    cfg: Config = config_from_yaml_text((ckpt / "config.yaml").read_text(), source=str(ckpt / "config.yaml"))
    trainer = build_trainer(cfg)
    base = snapshot(trainer.state()) if keep_base else None
    state = load_checkpoint(trainer.state(), ckpt)
    trainer.restore(state.iteration, state.trainer)
    return trainer, base


@torch.no_grad()
def sample_to_png(run: str | None, out: str, prompts: list[str] | None, n: int, steps: int, seed: int,
                  ema: bool | None = None, hybrid_steps: int = 0) -> Path:
    """Euler ODE samples, ``n`` per prompt, written as one PNG grid (one row per prompt); with the run's EMA weights
    when it has them (``ema=None``), or as ``ema`` says. ``hybrid_steps`` k > 0: the trained weights for the first
    k steps and the base model for the rest (MixGRPO's hybrid inference)."""
    if n < 1:
        raise ValueError(f"--n {n}: give at least one image per prompt (--n 8)")
    if not 0 <= hybrid_steps <= steps:
        raise ValueError(f"--hybrid-steps {hybrid_steps} must be between 0 and --steps {steps}; e.g. --hybrid-steps {steps // 2}")
    trainer, base = load_run_and_base(run, keep_base=hybrid_steps > 0)
    if ema and trainer.ema is None:
        raise ValueError(f"--ema: the run {run} has no EMA weights (it trained with train.ema_decay=0); drop --ema")
    prompts = prompts or trainer.prompts
    cond = trainer.policy.encode_prompts(prompts)
    rows = torch.arange(len(prompts)).repeat_interleave(n)  # [N]
    use_ema = trainer.ema is not None and ema is not False  # the run's EMA weights unless --no-ema, as `eval`
    with trainer.weights_swapped(trainer.ema) if use_ema else nullcontext():
        sigmas = method.base_sigmas(trainer.cfg, steps)
        if hybrid_steps:
            images = hybrid_images(trainer.held_out(), base, cond, rows, sigmas, seed, hybrid_steps)
        else:
            images = ode_images(trainer.policy, cond, rows, sigmas, seed, trainer.cfg.sampler.chunk_size,
                                trainer.cfg.rollout.decode_batch)
    save_grid(images, Path(out), columns=n)
    return Path(out)


def evaluate_run(run: str | Path) -> dict:
    """Held-out reward of a run's latest checkpoint with the run's evaluation settings."""
    return dict(load_run(run).evaluate())
