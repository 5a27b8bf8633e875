"""The policy contract: a velocity model, its prompt encoder and its decoder (design.md, sections 1 and 5).

A policy works on unpacked latents ``[B, *latent_shape]`` of any rank (images ``[B, C, H, W]``, videos
``[B, C, F, H, W]``) and exact sigmas in [0, 1] (1 = noise). Everything model-specific
(token packing, position ids, the model-facing ``timestep``) stays inside its adapter.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from flowgrove.registry import Registry


@dataclass(frozen=True)
class Conditioning:
    """Prompt conditioning of a batch, batch first in every field (FLUX: T5 tokens and pooled CLIP; SD3 adds the
    negative prompt's fields for classifier-free guidance; the edit models add their input image's latents, encoded
    once per prompt like the text)."""

    prompt_embeds: Tensor  # [B, L, D] token embeddings (FLUX ``encoder_hidden_states``)
    pooled: Tensor | None = None  # [B, P] pooled embedding (FLUX ``pooled_projections``); None if unused
    negative_prompt_embeds: Tensor | None = None  # [B, L, D] the negative prompt's tokens (CFG); None if unused
    negative_pooled: Tensor | None = None  # [B, P] the negative prompt's pooled embedding (CFG); None if unused
    image_latents: Tensor | None = None  # [B, N, D] the input image's latent tokens (edit models; several images':
    # one after another; Wan image-to-video: its first-frame mask and latents [B, 4 + C, F', H', W']); None if unused
    image_embeds: Tensor | None = None  # [B, N, D] an image encoder's states of the input image (Wan 2.1 I2V's CLIP)

    def __post_init__(self) -> None:
        rows = self.prompt_embeds.shape[0]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value.shape[0] != rows:
                raise ValueError(
                    f"Conditioning fields disagree on the batch size: prompt_embeds has {rows} rows, {f.name} has "
                    f"{value.shape[0]}; build every field from the same prompts."
                )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def select(self, index: Tensor) -> Conditioning:
        """Rows ``index`` of every field (``index_select`` on dim 0), e.g. to repeat prompts for their groups.

        Args:
            index: Row indices ``[N]`` (long), may repeat rows.

        Returns:
            A Conditioning with ``N`` rows.
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.prompt_embeds.device)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Conditioning(**{k: None if v is None else v.index_select(0, index) for k, v in fields.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """The same conditioning on ``device`` and/or in ``dtype``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Conditioning(**{k: None if v is None else v.to(device=device, dtype=dtype) for k, v in fields.items()})


class PromptRows(Protocol):
    """Conditioning rows by prompt index (an in-memory encoding or a cache on disk)."""

    def rows(self, ids: Tensor) -> Conditioning:
        """Conditioning ``[N, ...]`` of the prompts ``ids`` ``[N]`` (may repeat), on the CPU or the device."""
        ...


@dataclass(frozen=True)
class EncodedPrompts:
    """Every prompt encoded once and kept (small prompt sets)."""

    cond: Conditioning

    def rows(self, ids: Tensor) -> Conditioning:
        return self.cond.select(ids)


@runtime_checkable
class FlowPolicy(Protocol):
    """A rectified-flow generator as the trainer sees it (velocity ``v = noise - x0``).

    Attributes:
        latent_shape: Shape of one unpacked latent, any rank: ``(C, H, W)`` (images) or ``(C, F, H, W)`` (videos).
        module: The trainable transformer (what LoRA adapts, the optimizer trains and FSDP2 shards in place).

    Optional attribute: ``frozen_modules``, the models the policy computes with besides ``module`` and never trains
    (Wan 2.2 A14B's idle expert); ``policy.quantize`` quantises their blocks as it does ``module``'s.

    Optional methods (``flowgrove export``; a policy without them cannot be exported in that form):
        ``export_lora(state, lora_config, out)``: write peft's adapter ``state`` of ``module`` (scaling folded
        into ``lora_B``) and its ``LoraConfig`` kwargs into the folder ``out`` in diffusers' format for the
        family (the file ``pipe.load_lora_weights(out)`` loads). ``export_full(out)``: write the trained
        ``module`` (or the whole pipeline with it) into ``out`` so that ``from_pretrained(out)`` loads it.
    """

    latent_shape: tuple[int, ...]
    module: torch.nn.Module

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning ``[B, ...]`` for ``B`` prompts (no grad; text encoders are frozen)."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Velocity ``[B, *latent_shape]`` at latents ``x`` (same shape) and noise levels ``sigma`` ``[B]``."""
        ...

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H', W']`` or videos ``[B, F, 3, H', W']`` in [0, 1] from latents ``[B, *latent_shape]``."""
        ...


def makes_videos(policy: FlowPolicy) -> bool:
    """Whether the policy decodes videos ``[B, F, 3, H', W']``: its latents are ``(C, F, H, W)`` (the protocol's
    declared rank), not images' ``(C, H, W)``."""
    return len(policy.latent_shape) == 4


PolicyFactory = Callable[..., FlowPolicy]


@dataclass(frozen=True)
class LocalFolder:
    """The local diffusers folder a family loads from (``policy.path``), as its errors describe it."""

    family: str  # the policy name (``flux1``)
    folder: str  # what the folder holds (``FLUX.1``)
    download: str  # how to get it: the text after "Download it first, e.g. "
    input_images: str = ""  # folders whose prompts need an input image: "*" every one, else a substring of the
    # pipeline's ``_class_name`` in model_index.json (``ImageToVideo``); "" none
    several_images: str = ""  # of those, the folders whose prompts may give several input images: a substring of
    # the pipeline's ``_class_name`` (``EditPlus``); "" none (one image per prompt)

    def pipeline_class(self, path: str | Path) -> str:
        """The ``_class_name`` of the folder's ``model_index.json`` (already :meth:`check`-ed)."""
        return str(json.loads((Path(path) / "model_index.json").read_text()).get("_class_name", ""))

    def needs_input_images(self, path: str | Path) -> bool:
        """Whether the folder at ``path`` (already :meth:`check`-ed) edits or animates an input image per prompt."""
        if self.input_images in ("", "*"):
            return self.input_images == "*"
        return self.input_images in self.pipeline_class(path)

    def takes_several_images(self, path: str | Path) -> bool:
        """Whether a prompt may give the folder at ``path`` (already :meth:`check`-ed) several input images."""
        return bool(self.several_images) and self.several_images in self.pipeline_class(path)

    def check(self, path: str | Path) -> None:
        """``FileNotFoundError`` naming ``policy.path`` and the download when ``path`` holds no ``model_index.json``."""
        index = Path(path) / "model_index.json" if path else None
        if index is not None and index.is_file():
            try:
                named = isinstance(json.loads(index.read_text()).get("_class_name"), str)
            except (ValueError, AttributeError):  # not JSON, or not an object
                named = False
            if not named:
                raise ValueError(f"policy.path: {index} is not a diffusers model index (a JSON object with "
                                 f"\"_class_name\"); download the {self.folder} folder again, e.g. {self.download}")
            return
        what = "is a file" if path and Path(path).is_file() else "is not one"
        raise FileNotFoundError(f"policy.path: {self.family} needs a local diffusers {self.folder} folder (with "
                                f"model_index.json), but {str(path) or '<empty path>'!r} {what}. Download it first, "
                                f"e.g. {self.download}, then set policy.path to it.")


_POLICIES: Registry[PolicyFactory] = Registry("policy", "policies")
STEP_FAMILIES = ("flow", "diffusion")  # rectified flows (velocity), DDPM / DDIM models (eps or v): samplers.family
_FAMILIES: dict[str, str] = {}  # policy name -> the step family it declared at registration
_FOLDERS: dict[str, LocalFolder] = {}  # policy name -> the diffusers folder it needs in policy.path


def register_policy(name: str, folder: LocalFolder | None = None,
                    family: str = "flow") -> Callable[[PolicyFactory], PolicyFactory]:
    """Register a policy factory under ``name`` (a different factory under a used name raises ``ValueError``).

    ``folder``: the diffusers folder it needs in ``policy.path``, checked before any model loads
    (:func:`check_policy_folder`). ``family`` (one of ``STEP_FAMILIES``) declares the step family of the policies it
    builds (a ``diffusion`` policy carries a ``step_family`` of :func:`flowgrove.samplers.family.diffusion_steps`),
    so that config checks know it before any model loads.
    """
    if family not in STEP_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {STEP_FAMILIES}.")
    register = _POLICIES.register(name)

    def decorator(factory: PolicyFactory) -> PolicyFactory:
        register(factory)  # raises for a different factory under a used name, before anything is recorded
        _FAMILIES[name] = family
        if folder is not None:
            _FOLDERS[name] = folder
        return factory

    return decorator


def policy_family(name: str) -> str:
    """The step family the policy ``name`` declared (``"flow"`` for an unregistered name, which building reports)."""
    return _FAMILIES.get(name, "flow")


def check_policy_folder(name: str, path: str | Path) -> None:
    """The folder check of policy ``name`` (nothing for a policy that needs none); loads nothing."""
    policy_factory(name)  # an unknown name: the registry's error
    if name in _FOLDERS:
        _FOLDERS[name].check(path)


def needs_input_images(name: str, path: str | Path) -> bool:
    """Whether policy ``name``'s folder at ``path`` conditions on an input image per prompt (edit models,
    image-to-video); loads nothing. Call after :func:`check_policy_folder`."""
    return name in _FOLDERS and _FOLDERS[name].needs_input_images(path)


def takes_several_images(name: str, path: str | Path) -> bool:
    """Whether a prompt may give policy ``name``'s folder at ``path`` several input images (Qwen-Image-Edit-2509's
    ``QwenImageEditPlusPipeline``), not one; loads nothing. Call after :func:`check_policy_folder`."""
    return name in _FOLDERS and _FOLDERS[name].takes_several_images(path)


def policy_names() -> list[str]:
    """Sorted names of the registered policies."""
    return _POLICIES.names()


def policy_factory(name: str) -> PolicyFactory:
    """The factory registered under ``name`` (``ValueError`` for an unknown name, as :func:`build_policy`)."""
    return _POLICIES.factory(name)


def build_policy(name: str, **kwargs: object) -> FlowPolicy:
    """Build the registered policy ``name`` with the factory's keyword arguments (``path``, ``device``, ...).

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names and the closest one.
    """
    return _POLICIES.build(name, **kwargs)
