"""The model card ``README.md`` of a ``flowgrove export`` folder, in the Hugging Face format.

YAML front matter (``base_model``, ``library_name: diffusers``, ``pipeline_tag``, ``tags``) and a body with the
method and its preset, the rewards and their weights, the steps, the held-out results of the run's
``summary.json`` (when the run finished), how to load the folder, the flowgrove version and the resolved config.
Pure text from records: the caller writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import yaml

from flowgrove import __version__
from flowgrove.config.load import Config, preset_summary

CARD_FILE = "README.md"


@dataclass(frozen=True)
class ExportInfo:
    """What ``flowgrove_export.json`` records beside the exported weights."""

    format: str
    kind: str  # "lora" or "full"
    run: str
    checkpoint: str  # step_NNNNNN
    iteration: int
    ema: bool  # the EMA weights were exported (else the raw trained weights)
    policy: str  # policy.name
    base: str  # policy.path the run trained from ("" = the policy's built-in weights)
    lora_rank: int  # 0 for a full fine-tune
    lora_alpha: float  # the training alpha, already folded into lora_B (the file's scale is 1)


def run_summary(run: Path) -> dict | None:
    """The run's ``summary.json`` (written when training finished), or None."""
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def front_matter(info: ExportInfo, cfg: Config, video: bool) -> dict:
    """The card's metadata: ``base_model`` (the folder the run trained from; absent for built-in weights),
    ``library_name``, ``pipeline_tag`` and ``tags``."""
    tags = ["flowgrove", "grpo", "reinforcement-learning", "flow-matching", cfg.method, info.policy]
    tags += ["lora"] if info.kind == "lora" else []
    meta = {"base_model": info.base} if info.base else {}
    return {**meta, "library_name": "diffusers", "pipeline_tag": "text-to-video" if video else "text-to-image",
            "tags": list(dict.fromkeys(tags))}


def _results(summary: dict | None) -> list[str]:
    if summary is None:
        return ["The run has no `summary.json` (it stopped before its final evaluation): no held-out results."]
    keys = sorted(k[len("heldout_"):-len("_before")] for k in summary if k.startswith("heldout_") and k.endswith("_before"))
    rows = ["| held-out metric | before | after |", "|---|---|---|"]
    rows += [f"| {k} | {summary[f'heldout_{k}_before']:.4g} | {summary.get(f'heldout_{k}_after', float('nan')):.4g} |"
             for k in keys]
    return [*rows, "", f"Evaluated by the run after {summary.get('steps')} steps (`summary.json`)."]


def _usage(info: ExportInfo, out: Path, transformer_class: str, lora_load: Sequence[str] = ()) -> list[str]:
    pipeline = "from diffusers import DiffusionPipeline"
    base_is_pipeline = bool(info.base) and (Path(info.base) / "model_index.json").is_file()
    if info.kind == "lora" and base_is_pipeline:
        return [pipeline, f"pipe = DiffusionPipeline.from_pretrained({info.base!r})",
                "# adapter scale 1: alpha is folded into lora_B",
                *(lora_load or [f"pipe.load_lora_weights({str(out)!r})"])]
    if info.kind == "lora":  # the base is no pipeline folder (built-in weights): into the base transformer
        return [f"# transformer: the base {transformer_class}", f"transformer.load_lora_adapter({str(out)!r}, prefix='transformer', "
                "weight_name='pytorch_lora_weights.safetensors')"]
    if base_is_pipeline:  # export_full wrote a whole pipeline folder
        return [pipeline, f"pipe = DiffusionPipeline.from_pretrained({str(out)!r})"]
    return [f"from diffusers import {transformer_class}", f"transformer = {transformer_class}.from_pretrained({str(out)!r})"]


def _training(info: ExportInfo, cfg: Config) -> list[str]:
    p = cfg.policy
    weights = (f"LoRA rank {info.lora_rank}, alpha {info.lora_alpha:g} (folded into `lora_B`: load at scale 1) on "
               f"{', '.join(f'`{t}`' for t in p.lora_targets)}" if info.kind == "lora" else "full fine-tune")
    rewards = [f"| `{name}` | {weight:g} |" for name, weight in cfg.rewards.items()]
    return [
        f"- Method: `{cfg.method}` ({preset_summary(cfg.method)})",
        f"- Policy: `{info.policy}` from `{info.base or 'built-in weights'}`, {weights}",
        f"- Steps: {info.iteration} of {cfg.train.steps} (checkpoint `{info.checkpoint}`, "
        f"{'EMA' if info.ema else 'raw'} weights)",
        f"- Rollouts: {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples per step, "
        f"{cfg.sampler.num_steps} sampler steps",
        "", "| reward | weight |", "|---|---|", *rewards,
    ]


def model_card(info: ExportInfo, cfg: Config, config_text: str, summary: dict | None, out: Path, *,
               video: bool = False, transformer_class: str = "the transformer class",
               lora_load: Sequence[str] = ()) -> str:
    """The ``README.md`` text of an export folder.

    Args:
        info: What the export holds (``flowgrove_export.json``).
        cfg: The checkpoint's config.
        config_text: That config as saved (``config.yaml``), quoted in full.
        summary: The run's ``summary.json`` (None: no held-out results).
        out: The export folder (in the loading snippet).
        video: The policy generates videos (``pipeline_tag: text-to-video``).
        transformer_class: The trained module's diffusers class (loading a bare transformer folder).
        lora_load: The policy's own lines that load a LoRA export into ``pipe`` (``lora_usage``; default
            ``pipe.load_lora_weights(out)``).

    Returns:
        Markdown with YAML front matter.
    """
    meta = yaml.safe_dump(front_matter(info, cfg, video), sort_keys=False)
    body = [
        f"# {cfg.method} fine-tune of `{info.base or info.policy}`", "",
        f"GRPO alignment with flowgrove {__version__} (`flowgrove export` of the run `{info.run}`).", "",
        "## Training", "", *_training(info, cfg), "",
        "## Held-out results", "", *_results(summary), "",
        "## Usage", "", "```python", *_usage(info, out, transformer_class, lora_load), "```", "",
        "## Config", "", f"flowgrove {__version__}, the run's resolved config:", "", "```yaml", config_text.rstrip(),
        "```",
    ]
    return f"---\n{meta}---\n\n" + "\n".join(body) + "\n"
