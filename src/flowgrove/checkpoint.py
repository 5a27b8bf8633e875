"""Checkpoints: trainable weights and EMA (safetensors), optimizer state (tensors only, loaded with
``weights_only=True``), the global RNG, the iteration and the resolved config. Written to a temporary folder and
renamed into place, so a kill at any moment leaves either the old or the new checkpoint, never half of one.

Every sampling generator is derived from (seed, iteration, stream, rank) (``trainer.step_generator``), so the
iteration number restores them exactly; the global torch RNG is saved as well for anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowgrove.trainer import GRPOTrainer

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(trainer: GRPOTrainer, run_dir: Path, config_yaml: str, keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXX`` atomically and point ``checkpoints/latest`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{trainer.iteration:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = [n for n, p in trainer.policy.module.named_parameters() if p.requires_grad]
    save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, trainer.params)}, str(tmp / "trainable.safetensors"))
    if trainer.ema is not None:
        save_file({n: e.contiguous().cpu() for n, e in zip(names, trainer.ema)}, str(tmp / "ema.safetensors"))
    if trainer.reference is not None:
        save_file({n: r.contiguous().cpu() for n, r in zip(names, trainer.reference)}, str(tmp / "reference.safetensors"))
    torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "state.json").write_text(json.dumps({"iteration": trainer.iteration}))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(trainer: GRPOTrainer, path: Path) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into a freshly built trainer."""
    names = [n for n, p in trainer.policy.module.named_parameters() if p.requires_grad]
    weights = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable tensors {missing[:3]}...; was it written with another policy or LoRA setting?")
    with torch.no_grad():
        for n, p in zip(names, trainer.params):
            p.copy_(weights[n])
        for attr, file in (("ema", "ema.safetensors"), ("reference", "reference.safetensors")):
            if getattr(trainer, attr) is not None:
                saved = load_file(str(path / file))
                for buf, n in zip(getattr(trainer, attr), names):
                    buf.copy_(saved[n])
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
    trainer.iteration = json.loads((path / "state.json").read_text())["iteration"]
