"""`flowgrove sample` and `flowgrove eval`: load a run's latest checkpoint (or the base policy) and sample."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from flowgrove import method
from flowgrove.checkpoint import latest_checkpoint, load_checkpoint
from flowgrove.config import Config, config_from_yaml_text, load_config
from flowgrove.metrics import save_grid
from flowgrove.runner import build_trainer
from flowgrove.trainer import GRPOTrainer, ode_images


def load_run(run: str | Path | None) -> GRPOTrainer:
    """A trainer holding a run's latest weights (EMA swapped in by ``evaluate``), or the base policy."""
    if run is None:
        return build_trainer(load_config())
    ckpt = latest_checkpoint(Path(run))
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no intact checkpoint (expected {run}/checkpoints/step_N); is it a run directory?")
    cfg: Config = config_from_yaml_text((ckpt / "config.yaml").read_text(), source=str(ckpt / "config.yaml"))
    trainer = build_trainer(cfg)
    load_checkpoint(trainer, ckpt)
    return trainer


@torch.no_grad()
def sample_to_png(run: str | None, out: str, prompts: list[str] | None, n: int, steps: int, seed: int,
                  ema: bool | None = None) -> Path:
    """Euler ODE samples, ``n`` per prompt, written as one PNG grid (one row per prompt); with the run's EMA weights
    when it has them (``ema=None``), or as ``ema`` says."""
    if n < 1:
        raise ValueError(f"--n {n}: give at least one image per prompt (--n 8)")
    trainer = load_run(run)
    if ema and trainer.ema is None:
        raise ValueError(f"--ema: the run {run} has no EMA weights (it trained with train.ema_decay=0); drop --ema")
    prompts = prompts or trainer.prompts
    cond = trainer.policy.encode_prompts(prompts)
    rows = torch.arange(len(prompts)).repeat_interleave(n)  # [N]
    use_ema = trainer.ema is not None and ema is not False  # the run's EMA weights unless --no-ema, as `eval`
    with trainer.weights_swapped(trainer.ema) if use_ema else nullcontext():
        images = ode_images(trainer.policy, cond, rows, method.base_sigmas(trainer.cfg, steps), seed, trainer.cfg.sampler.chunk_size,
                            trainer.cfg.rollout.decode_batch)
    save_grid(images, Path(out), columns=n)
    return Path(out)


def evaluate_run(run: str | Path) -> dict:
    """Held-out reward of a run's latest checkpoint with the run's evaluation settings."""
    return dict(load_run(run).evaluate())
