"""What a Wan folder holds, read before any weights load (its pipeline class, experts and flow-matching schedule),
and Wan 2.2 A14B's two experts as one trained module (``expert="both"``). Used by :mod:`flowgrove.policies.wan`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from torch import Tensor, nn

from flowgrove.messages import ConfigError, note


EXPERTS = ("high", "low", "both")  # policy.options.expert: which Wan 2.2 A14B expert trains
COMPONENTS = ("transformer", "transformer_2")  # the experts' pipeline components, high-noise first
LOW_NOISE_LORA = "pytorch_lora_weights_transformer_2.safetensors"  # expert="both": the low-noise expert's LoRA file


@dataclass(frozen=True)
class WanSchedule:
    """The sigma grid a Wan folder's scheduler samples on, as flowgrove's ``flux`` grid takes it."""

    scheduler: str  # the folder's scheduler class (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)
    shift: float  # its time shift: sampler.shift that puts flowgrove's grid on the folder's sigmas


def wan_schedule(config: Mapping, where: str = "scheduler") -> WanSchedule:
    """The folder's flow-matching schedule from its scheduler config (``scheduler/scheduler_config.json``).

    ``FlowMatchEulerDiscreteScheduler`` (Wan 2.1): ``shift``. ``UniPCMultistepScheduler`` (Wan 2.2 as it ships,
    ``prediction_type="flow_prediction"``, ``use_flow_sigmas``): ``flow_shift``; its grid is
    ``shift(linspace(1 - 1/1000 ... 0))``, flowgrove's ``flux`` grid at that shift within ``shift / 1000``.

    Raises:
        ConfigError: a scheduler that does not sample flow-matching sigmas (``where`` names its file).
    """
    name = str(config.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    if name == "FlowMatchEulerDiscreteScheduler" and not config.get("use_dynamic_shifting", False):
        return WanSchedule(name, float(config.get("shift", 1.0)))
    if config.get("prediction_type") == "flow_prediction" and config.get("use_flow_sigmas", False):
        return WanSchedule(name, float(config.get("flow_shift", 1.0)))
    raise ConfigError(f"policy.path: {where} is {name} without flow-matching sigmas (prediction_type="
                      f"{config.get('prediction_type')!r}, use_flow_sigmas={config.get('use_flow_sigmas')}); the wan "
                      "policy needs a Wan folder as Wan-AI ships it (FlowMatchEuler, or UniPC with use_flow_sigmas)")


@dataclass(frozen=True)
class WanFolder:
    """What a Wan folder's ``model_index.json`` says, read before any weights load."""

    pipeline: str  # WanPipeline (text-to-video), WanImageToVideoPipeline or SkyReelsV2ImageToVideoPipeline
    experts: int  # 2: Wan 2.2 A14B (transformer_2 and boundary_ratio), else 1
    expand_timesteps: bool  # Wan 2.2 TI2V-5B: per-token timesteps


# the pipelines the wan adapter drives: SkyReels-V2 I2V is Wan 2.1 I2V's loop with its own transformer class
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "SkyReelsV2ImageToVideoPipeline")


def experts_in_index(index: dict) -> int:
    """Transformers a pipeline's ``model_index.json`` (as a dict) names: 2 with a ``transformer_2`` component and a
    ``boundary_ratio`` (Wan 2.2 A14B), else 1."""
    two = (index.get("transformer_2") or [None])[0] is not None and index.get("boundary_ratio") is not None
    return 2 if two else 1


def read_wan_folder(folder: Path) -> WanFolder:
    """The folder's :class:`WanFolder` from ``model_index.json`` alone.

    Raises:
        ConfigError: a pipeline class the wan policy does not drive, or image-to-video with per-token timesteps
            (TI2V-5B's image mode replaces the first latent frame instead of conditioning on it).
    """
    index = json.loads((folder / "model_index.json").read_text())
    info = WanFolder(str(index.get("_class_name")), experts_in_index(index), bool(index.get("expand_timesteps")))
    if info.pipeline not in PIPELINES:
        raise ConfigError(f"policy.path: {folder} holds a {info.pipeline} folder; the wan policy drives "
                          f"{', '.join(PIPELINES)} folders: point policy.path at one")
    if info.pipeline == "WanImageToVideoPipeline" and info.expand_timesteps:
        raise ConfigError(f"policy.path: {folder} is Wan 2.2 TI2V-5B image-to-video (expand_timesteps), which the wan "
                          "policy does not support yet: use its text-to-video folder (WanPipeline) or Wan 2.1 / 2.2 "
                          "A14B image-to-video")
    return info


def check_expert(expert: str, experts: int, folder: Path) -> None:
    """Refuse an ``expert`` that is not one of :data:`EXPERTS`, or ``low``/``both`` on a one-expert folder.

    Raises:
        ConfigError: naming ``policy.options.expert`` and the fix.
    """
    if expert not in EXPERTS:
        raise ConfigError(f"policy.options.expert={expert!r} is not allowed; set high (transformer), low "
                          "(transformer_2) or both")
    if expert != "high" and experts == 1:
        raise ConfigError(f"policy.options.expert={expert} needs a two-expert folder (Wan 2.2 A14B: transformer_2 "
                          f"and boundary_ratio in model_index.json); {folder} has one transformer: drop the option")


class WanExperts(nn.Module):
    """Both experts of Wan 2.2 A14B as the one trained module of ``expert="both"``: the trainer's LoRA,
    float32 masters, checkpoints and exports see ``transformer.*`` and ``transformer_2.*`` (the pipeline's component
    names); ``add_adapter`` and gradient checkpointing reach each expert."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    @property
    def experts(self) -> tuple[nn.Module, nn.Module]:
        """``(transformer, transformer_2)``: high-noise, low-noise."""
        return self.transformer, self.transformer_2

    @property
    def peft_config(self) -> dict:
        """The experts' (identical) peft adapter configs, as diffusers' ``ModelMixin`` keeps them."""
        return self.transformer.peft_config

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """The same peft adapter on each expert (diffusers' ``add_adapter``)."""
        for expert in self.experts:
            expert.add_adapter(adapter_config, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        """Each expert's own switch."""
        for expert in self.experts:
            expert.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        """Each expert's own switch."""
        for expert in self.experts:
            expert.disable_gradient_checkpointing()


def split_experts_state(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A :class:`WanExperts` state (``transformer.<key>``, ``transformer_2.<key>``) as each expert's own
    (``{"transformer": {<key>: ...}, "transformer_2": {...}}``)."""
    parts: dict[str, dict[str, Tensor]] = {"transformer": {}, "transformer_2": {}}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        parts[component][rest] = value
    return parts


def read_wan_schedule(folder: Path) -> WanSchedule:
    """:func:`wan_schedule` of the folder's ``scheduler/scheduler_config.json`` (FlowMatchEuler's defaults without
    one), with a note on stderr when it is not the flow-match Euler scheduler flowgrove's steps are."""
    file = folder / "scheduler" / "scheduler_config.json"
    schedule = wan_schedule(json.loads(file.read_text()) if file.is_file() else {}, str(file))
    if schedule.scheduler != "FlowMatchEulerDiscreteScheduler":
        note(f"wan: {folder} ships {schedule.scheduler} (flow shift {schedule.shift:g}); flowgrove samples its own "
             f"flow-match steps instead, on the folder's sigma grid with sampler.shift={schedule.shift:g}")
    return schedule
