"""What a resume starts from: the checkpoint, its config with the keys a resume may change, and the run folder
brought in line with it (checkpoints after it removed, ``config.yaml`` written back)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from flowgrove.config.files import parse_yaml
from flowgrove.config.load import Config, ConfigError, build_config, config_to_yaml
from flowgrove.config.resume import carried, flat_keys
from flowgrove.parallel import distributed
from flowgrove.runs import rundir
from flowgrove.runs.checkpoint import CheckpointError, Choice, choose_checkpoint, discard_after


@dataclass
class ResumePlan:
    choice: Choice
    cfg: Config
    saved_yaml: str  # the checkpoint's config.yaml as written


def resume_plan(run_dir: Path, checkpoint: str | None, changes: dict) -> ResumePlan:
    """The checkpoint to resume and its config, with the keys a resume may change taken from the run folder's
    ``config.yaml`` (an earlier resume's or an edit) and then from ``changes`` (this resume's ``key=value``); a note
    when it was written on another number of ranks, and one naming the keys taken from the folder."""
    choice = choose_checkpoint(run_dir, checkpoint)
    if choice is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume (expected {run_dir}/checkpoints/step_N); "
                                f"start afresh with `flowgrove train --out {run_dir} --overwrite`")
    world, _ = distributed.world_size_and_rank()
    if choice.state.world_size != world:
        choice = replace(choice, notes=(*choice.notes, (
            f"{choice.path.name} was written on {choice.state.world_size} process(es), this resume has {world}: "
            "its sharded weights and optimizer state are resharded on load, and rollout.prompts_per_step is the "
            "global batch, so the run continues with the same one")))
    file = choice.path / "config.yaml"
    saved_yaml = file.read_text()
    try:
        saved = parse_yaml(saved_yaml, str(file))
        cfg = build_config([saved])
    except Exception as err:  # noqa: BLE001  (YAML or schema errors of a config from another version)
        raise CheckpointError(f"checkpoint file {file} is not a valid config ({str(err).splitlines()[0]}); "
                              "pick another checkpoint with `--checkpoint step_N`") from None
    kept = _folder_settings(run_dir, saved)
    if kept:
        choice = replace(choice, notes=(*choice.notes, f"taking {', '.join(sorted(flat_keys(kept)))} from "
                                                       f"{run_dir / 'config.yaml'} (a resume may change them)"))
    if kept or changes:
        cfg = build_config([saved, kept, changes])
    return ResumePlan(choice, cfg, saved_yaml)


def _folder_settings(run_dir: Path, saved: dict) -> dict:
    """The layer of resumable keys the run folder's ``config.yaml`` changed from the checkpoint's config ``saved``;
    nothing when the file is missing or unreadable (:func:`rundir.reconcile_config` reports that)."""
    try:
        return carried(saved, parse_yaml((Path(run_dir) / "config.yaml").read_text(), "config.yaml"))
    except (OSError, ConfigError):
        return {}


def settle_run_dir(run_dir: Path, plan: ResumePlan) -> list[str]:
    """Drop checkpoints after the resumed one, point ``latest`` at it, and sync ``config.yaml`` with the config that
    resumes; returns one note per thing to report."""
    notes = [f"removed {path}: the run continues from {plan.choice.path.name}"
             for path in discard_after(run_dir, plan.choice.path)]
    edited = rundir.reconcile_config(run_dir, plan.saved_yaml, config_to_yaml(plan.cfg))
    return notes + ([edited] if edited else [])
