"""`flowgrove export`: a run's checkpoint as files diffusers loads (design.md, section 5).

A LoRA run becomes ``pytorch_lora_weights.safetensors`` in diffusers' format for the policy's family (the keys
``pipe.load_lora_weights`` expects), with each layer's ``alpha / r`` folded into ``lora_B`` so that the default
adapter scale 1 reproduces training in any loader; the saved ``LoraConfig`` metadata says ``lora_alpha = r``.
A full fine-tune becomes a folder that ``from_pretrained`` loads. The policy writes its family's format through
two optional methods, ``export_lora(state, lora_config, out)`` and ``export_full(out)``; this module picks and
verifies the checkpoint (``choose_checkpoint``), loads its weights into the policy built as the run built it
(the EMA weights when the run has them, as ``flowgrove sample`` does; no rewards, optimizer or prompts), and
writes into a temporary sibling of ``--out`` that is renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from flowgrove.config.load import Config, config_from_yaml_text
from flowgrove.messages import note
from flowgrove.policies.base import FlowPolicy
from flowgrove.runs import sharded
from flowgrove.runs.checkpoint import SHARDS, CheckpointState, choose_checkpoint
from flowgrove.runs.model_card import CARD_FILE, ExportInfo, model_card, run_summary
from flowgrove.training.prepare import prepare_policy

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
INFO_FILE = "flowgrove_export.json"
FORMAT = "flowgrove-export-v1"


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the argument and the fix (one line)."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    info: ExportInfo
    files: tuple[str, ...]  # paths relative to ``out``
    lora_load: tuple[str, ...] = ()  # the policy's own lines loading the LoRA into ``pipe`` (``lora_usage``), if any


def folded_lora(module: nn.Module, adapter: str = "default") -> tuple[dict[str, Tensor], dict]:
    """peft's adapter state of ``module`` with each layer's scaling folded into ``lora_B``, and its LoraConfig.

    Args:
        module: A model with a peft LoRA adapter (diffusers ``add_adapter``).
        adapter: The adapter's name.

    Returns:
        ``(state, lora_config)``: ``get_peft_model_state_dict`` keys (``...to_q.lora_A.weight`` ``[r, in]``,
        ``...lora_B.weight`` ``[out, r]`` times ``alpha / r``) and ``LoraConfig`` keyword arguments with
        ``lora_alpha = r`` (and ``alpha_pattern = rank_pattern``, no rsLoRA), so that scale 1 reproduces training.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module, adapter_name=adapter).items()}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.scaling:
            key = f"{name}.lora_B.weight"
            if key not in state:
                raise ExportError(f"LoRA layer {name} has no {key} in peft's state dict; only plain LoRA adapters "
                                  "(no DoRA, no LoRA bias) can be exported")
            state[key] = state[key] * layer.scaling[adapter]  # [out, r]
    config = module.peft_config[adapter].to_dict()
    config.update(lora_alpha=config["r"], alpha_pattern=dict(config.get("rank_pattern") or {}), use_rslora=False)
    return state, config


def prepare_out(out: Path, run: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, holds the run, or is a non-empty folder without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder path")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise ExportError(f"--out {out} holds the run {run}; export into another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pick a new folder or add --overwrite to replace it")


def _run_config(run: Path, checkpoint: str | None) -> tuple[Path, Config, CheckpointState]:
    """The chosen intact checkpoint of ``run``, its config and its verified state."""
    choice = choose_checkpoint(run, checkpoint)
    if choice is None:
        raise ExportError(f"{run} has no checkpoint (expected {run}/checkpoints/step_N); pass a run directory "
                          "that `flowgrove train` wrote")
    source = choice.path / "config.yaml"
    return choice.path, config_from_yaml_text(source.read_text(), source=str(source)), choice.state


def _write(policy: FlowPolicy, kind: str, tmp: Path) -> None:
    """The policy writes its family's format into ``tmp`` (``export_lora`` or ``export_full``)."""
    method = "export_lora" if kind == "lora" else "export_full"
    writer = getattr(policy, method, None)
    if writer is None:
        raise ExportError(f"{type(policy).__name__} has no {method}(); this policy family cannot export "
                          f"{'LoRA weights' if kind == 'lora' else 'a full model'} yet (add it to its adapter file)")
    if kind == "lora":
        state, lora_config = folded_lora(policy.module)
        writer(state, lora_config, tmp)
    else:
        writer(tmp)


def _write_folder(policy: FlowPolicy, info: ExportInfo, out: Path, card: str) -> tuple[str, ...]:
    """Everything into a hidden sibling of ``out``, renamed to ``out`` once complete (an old ``out`` is replaced;
    :func:`prepare_out` checked it). Returns the files, relative to ``out``."""
    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(policy, info.kind, tmp)
        (tmp / INFO_FILE).write_text(json.dumps(asdict(info), indent=1))
        (tmp / CARD_FILE).write_text(card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return tuple(sorted(str(f.relative_to(target)) for f in target.rglob("*") if f.is_file()))


def load_trained_policy(cfg: Config, path: Path, ema: bool) -> FlowPolicy:
    """The run's policy (built as it trained, on the CPU, but over the unquantised base: ``policy.quantize`` only
    stored the frozen weights in fewer bits) holding checkpoint ``path``'s trainable weights, or its EMA weights,
    read in this one process from the DCP folder whatever number of ranks wrote it. Builds no rewards, optimizer or
    prompt encodings: exporting needs none of them."""
    policy = prepare_policy(replace(cfg, policy=replace(cfg.policy, quantize="none")), torch.device("cpu"))
    folder = path / SHARDS  # verified against state.json by choose_checkpoint
    try:
        sharded.load_full(policy.module, folder, "ema" if ema else "model")
    except sharded.ShardedError as err:
        raise ExportError(f"checkpoint {folder} does not fit the run's policy ({err}); was it written with another "
                          "policy or LoRA setting? Export it with the flowgrove version that trained it") from None
    return policy


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None, ema: bool | None = None,
               overwrite: bool = False) -> ExportResult:
    """Export a run's checkpoint (default: the newest intact one) for diffusers.

    Args:
        run: The run directory.
        out: The folder to write (must not exist, be empty, or ``overwrite``).
        checkpoint: ``step_N`` to export instead of the newest intact checkpoint.
        ema: None = the EMA weights when the run has them; True = EMA (an error without); False = raw weights.
        overwrite: Replace a non-empty ``out``.

    Returns:
        Where the files went and what they hold.
    """
    run, out = Path(run), Path(out)
    prepare_out(out, run, overwrite)
    path, cfg, state = _run_config(run, checkpoint)
    has_ema = "ema" in sharded.stored_parts(path / SHARDS)
    if ema and not has_ema:
        raise ExportError(f"--ema: the run {run} has no EMA weights (it trained with train.ema_decay=0); drop --ema")
    use_ema = has_ema and ema is not False
    p = cfg.policy
    if p.quantize != "none":
        note(f"the run trained its LoRA over a base quantised to {p.quantize} (policy.quantize); the export is the "
             f"LoRA for the unquantised base ({p.path or p.name}), which diffusers loads it onto")
    policy = load_trained_policy(cfg, path, use_ema)
    kind = "lora" if p.lora_rank > 0 else "full"
    info = ExportInfo(FORMAT, kind, str(run), path.name, state.iteration, use_ema, p.name, p.path, p.lora_rank,
                      float(p.lora_alpha or 2 * p.lora_rank) if kind == "lora" else 0.0)
    usage = getattr(policy, "lora_usage", None)
    lora_load = tuple(usage(str(out))) if usage is not None and kind == "lora" else ()
    card = model_card(info, cfg, (path / "config.yaml").read_text(), run_summary(run), out,
                      video=len(policy.latent_shape) == 4, transformer_class=type(policy.module).__name__,
                      lora_load=lora_load)
    return ExportResult(out, info, _write_folder(policy, info, out, card), lora_load)


def load_hint(result: ExportResult) -> str:
    """One line on how diffusers loads the export."""
    out, info = str(result.out), result.info
    if info.kind == "lora" and info.base and (Path(info.base) / "model_index.json").is_file():
        loads = "; ".join(result.lora_load or [f"pipe.load_lora_weights({out!r})"])
        return f"load with pipe = DiffusionPipeline.from_pretrained({info.base!r}); {loads}"
    if info.kind == "lora":  # a base that is no pipeline folder (digits)
        return (f"load into the base transformer with transformer.load_lora_adapter({out!r}, prefix='transformer', "
                f"weight_name={LORA_FILE!r})")
    if (result.out / "model_index.json").is_file():
        return f"load with DiffusionPipeline.from_pretrained({out!r})"
    name = json.loads((result.out / "config.json").read_text()).get("_class_name", "the model class")
    return f"load with {name}.from_pretrained({out!r})"
