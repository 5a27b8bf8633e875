"""Loading a local diffusers pipeline folder offline, and the helpers the families share (decoding, text padding,
exports).

Light to import: diffusers is imported by the caller, which passes its pipeline class.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.messages import ConfigError
from flowgrove.policies.base import LocalFolder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_folder(path: str, spec: LocalFolder, dtype: str) -> Path:
    """The family's diffusers folder ``path``, once ``dtype`` is a known dtype and the folder holds
    ``model_index.json`` (the first checks of every factory, before any weights load).

    Raises:
        ValueError: an unknown ``dtype``.
        FileNotFoundError: ``path`` is not a diffusers folder; the message says what to download.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    spec.check(path)
    return Path(path)


def component_configs(folder: Path, names: Sequence[str]) -> dict[str, dict]:
    """The settings of the folder's diffusers components ``names`` as their classes read them (``config.json`` over
    the class's ``__init__`` defaults), from the folder's files alone: no weights load. A component the folder does
    not have (``model_index.json`` lists None, or no config file) is left out."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    configs = {}
    for name in names:
        library, class_name = (index.get(name) or [None, None])[:2]
        file = folder / name / "config.json"
        if library != "diffusers" or not class_name or not file.is_file():
            continue
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        configs[name] = {**defaults, **json.loads(file.read_text())}
    return configs


@dataclass(frozen=True)
class SizeRule:
    """The sizes a family's pipeline takes as they are (anything else it rounds or refuses)."""

    side: int  # height and width in pixels are multiples of this
    why: str  # where ``side`` comes from, e.g. "VAE scale 8 x patch 2"
    frames: int = 0  # video frames are 1 + frames * k (the VAE's temporal compression); 0: no frame option


def nearest_valid(value: int, step: int, first: int) -> list[int]:
    """The valid values ``first + step * k`` (``k >= 0``) nearest ``value``: the one below it (when there is one)
    and the one above."""
    below = first + (value - first) // step * step
    return [below, below + step] if below >= first else [first]


def check_size(family: str, rule: SizeRule, height: int, width: int, num_frames: int | None = None) -> None:
    """Refuse (never round) a size the pipeline would change: ``policy.options.height`` / ``width`` not a multiple
    of ``rule.side``, ``num_frames`` not ``1 + rule.frames * k``.

    Raises:
        ConfigError: naming the option, why, and the nearest valid values.
    """
    for key, value in (("height", height), ("width", width)):
        if int(value) < rule.side or int(value) % rule.side:
            near = " or ".join(map(str, nearest_valid(int(value), rule.side, rule.side)))
            raise ConfigError(f"policy.options.{key}={value} is not a multiple of {rule.side} ({family}: {rule.why}); "
                              f"set policy.options.{key}={near}")
    if num_frames is not None and rule.frames and (int(num_frames) < 1 or (int(num_frames) - 1) % rule.frames):
        near = " or ".join(map(str, nearest_valid(int(num_frames), rule.frames, 1)))
        raise ConfigError(f"policy.options.num_frames={num_frames} is not 1 + {rule.frames} * k ({family}: the VAE "
                          f"compresses {rule.frames} frames into one after the first); "
                          f"set policy.options.num_frames={near}")


def check_folder_size(folder: Path, family: str, rule_of: Callable[[Mapping[str, Mapping]], SizeRule],
                      names: Sequence[str], height: int, width: int, num_frames: int | None = None) -> None:
    """:func:`check_size` from the folder's component configs ``names`` (:func:`component_configs`), before any
    weights load; ``rule_of`` is the family's size rule over them (the same one the policy applies to the loaded
    pipeline's configs). A folder without those configs is left to the loader's error.

    Raises:
        ConfigError: a size the pipeline would round.
    """
    configs = component_configs(folder, names)
    if all(name in configs for name in names):
        check_size(family, rule_of(configs), height, width, num_frames)


def vae_scale(vae_config: Mapping) -> int:
    """The spatial scale of an ``AutoencoderKL`` from its config, as the pipelines compute ``vae_scale_factor``:
    ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_local_pipeline(pipeline_cls: Any, path: str, spec: LocalFolder, *, dtype: str, device: str | torch.device,
                        frozen: Sequence[str], float32_vae: Any = None,
                        components: Mapping[str, Any] | None = None) -> Any:
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` in ``dtype`` on ``device``, ``frozen``
    components in eval mode without gradients.

    Args:
        pipeline_cls: The diffusers pipeline class (``FluxPipeline``, ``StableDiffusion3Pipeline``, ...).
        path: The folder with ``model_index.json``.
        spec: The family and its folder, for the errors.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        device: Where every component goes.
        frozen: Names of the components to freeze (text encoders, VAE); absent or None ones are skipped.
        float32_vae: A VAE class to load from ``path/vae`` in float32 (Wan, Qwen-Image), as diffusers' examples do.
        components: Components given instead of loaded (``from_pretrained`` keywords; None skips one: FLUX.2's
            ``PixtralProcessor``, which the family sets itself).

    Raises:
        ValueError: an unknown ``dtype``.
        FileNotFoundError: ``path`` is not a diffusers folder; the message says what to download.
    """
    local_folder(path, spec, dtype)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        extra = dict(components or {})
        if float32_vae is not None:
            extra["vae"] = float32_vae.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        pipe = pipeline_cls.from_pretrained(str(path), torch_dtype=DTYPES[dtype], local_files_only=True, **extra)
    pipe.to(device)
    for name in frozen:
        component = getattr(pipe, name, None)
        if component is not None:
            component.requires_grad_(False).eval()
    return pipe


def input_image_paths(prompt: str, family: str) -> list[str]:
    """The absolute paths of a prompt's input images, in order: ``prompt.metadata["images"]`` (what
    ``flowgrove.training.prompts.read_prompts`` resolved and checked from the prompt file's ``image`` field), or
    ``metadata["image"]`` alone (a row built in code, an older prompt cache).

    Raises:
        ValueError: a prompt without an input image (a plain string, or a row without ``image``).
    """
    metadata = getattr(prompt, "metadata", {})
    paths = metadata.get("images") or ([metadata["image"]] if metadata.get("image") else [])
    if not paths:
        raise ValueError(f"{family} edits an input image: prompt {str(prompt)!r} has none; give data.train as a "
                         '.jsonl ({"prompt": "...", "image": "input.png"}) or .csv with an image column')
    return list(paths)


def _read_rgb(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def input_images(prompts: Sequence[str], family: str) -> list[Any]:
    """The RGB input image of each prompt as a PIL image (:func:`input_image_paths`), for a family that takes one.

    Raises:
        ValueError: a prompt without an input image, or with several.
    """
    images = []
    for prompt in prompts:
        paths = input_image_paths(prompt, family)
        if len(paths) > 1:
            raise ValueError(f"{family} takes one input image per prompt, but prompt {str(prompt)!r} has "
                             f"{len(paths)}; give one image per row")
        images.append(_read_rgb(paths[0]))
    return images


def input_image_sets(prompts: Sequence[str], family: str) -> list[list[Any]]:
    """Each prompt's RGB input images, in order, as PIL images (:func:`input_image_paths`), for a family that takes
    several: every prompt gives the same number, as their tokens stack into one batch.

    Raises:
        ValueError: a prompt without an input image, or prompts with different numbers of them.
    """
    paths = [input_image_paths(prompt, family) for prompt in prompts]
    for prompt, row in zip(prompts, paths):
        if len(row) != len(paths[0]):
            raise ValueError(f"{family} stacks prompts with one number of input images, but prompt "
                             f"{str(prompts[0])!r} has {len(paths[0])} and {str(prompt)!r} {len(row)}; give every "
                             "row of a prompt file the same number")
    return [[_read_rgb(path) for path in row] for row in paths]


def decode_wan_vae(vae: nn.Module, latents: Tensor) -> Tensor:
    """Pixels ``[B, 3, F, H, W]`` in [0, 1] from normalised latents ``[B, C, F', H', W']`` (Wan VAE; Qwen-Image's too).

    As the pipelines' decode: ``latents * latents_std + latents_mean`` per channel (they write it
    ``x / (1 / std) + mean``), ``vae.decode``, then ``VaeImageProcessor.postprocess``'s ``x / 2 + 0.5`` clamped.
    """
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=torch.float32).view(shape)
    pixels = vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1)


def text_mask(prompt_embeds: Tensor) -> Tensor:
    """Token mask ``[B, L]`` (bool) of zero-padded text states ``[B, L, D]``: a row is a token unless it is all zero."""
    return prompt_embeds.ne(0).any(dim=-1)  # [B, L]


def pad_text_states(embeds: Tensor, mask: Tensor | None, length: int) -> Tensor:
    """Text states ``[B, L, D]`` with their padding rows (``mask`` False) set to zero, cut or zero-padded to
    ``length`` rows, so every encoding (and the prompt cache) has one length and :func:`text_mask` recovers the mask."""
    if mask is not None:
        embeds = embeds * mask[..., None].to(embeds.dtype)  # [B, L, D], padding rows exactly zero
    embeds = embeds[:, :length]
    return torch.cat([embeds, embeds.new_zeros(embeds.shape[0], length - embeds.shape[1], embeds.shape[2])], dim=1)


def decode_sd_vae(vae: nn.Module, latents: Tensor) -> Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] from SD latents ``[B, C, h, w]``, as ``StableDiffusionPipeline`` and
    ``StableDiffusionXLPipeline`` decode: ``x * std / scaling_factor + mean`` when the VAE config has
    ``latents_mean``/``latents_std``, else ``x / scaling_factor``; ``vae.decode``; ``x / 2 + 0.5`` clamped."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
    return (image / 2 + 0.5).clamp(0, 1).to(latents.dtype)


def unet_size_rule(configs: Mapping[str, Mapping]) -> SizeRule:
    """SD1.x / SDXL (``configs["vae"]``): sides are multiples of the VAE scale (the pipelines' ``check_inputs``)."""
    scale = vae_scale(configs["vae"])
    return SizeRule(scale, f"VAE scale {scale}")


def unet_latent_shape(pipe: Any, height: int, width: int, family: str) -> tuple[int, int, int]:
    """``(C, H / f, W / f)`` of an SD1.x / SDXL latent, ``f`` the VAE scale ``2 ** (len(block_out_channels) - 1)``.

    Raises:
        ConfigError: ``height`` or ``width`` is not a multiple of ``f`` (:func:`check_size`).
    """
    check_size(family, unet_size_rule({"vae": pipe.vae.config}), height, width)
    scale = vae_scale(pipe.vae.config)
    return (int(pipe.unet.config.in_channels), int(height) // scale, int(width) // scale)


class PipelineExports:
    """``export_lora`` and ``export_full`` (the FlowPolicy protocol's optional exports) of a policy that holds its
    diffusers pipeline in ``pipe`` and the trained module in ``module``, the pipeline's ``TRAINED`` component: the
    LoRA file the pipeline's own ``save_lora_weights`` writes (``pipe.load_lora_weights(out)`` loads it), and a
    pipeline folder with the trained module (``<Pipeline>.from_pretrained(out)``); docs/export.md lists them per
    family."""

    TRAINED = "transformer"  # the pipeline component ``module`` is (``unet`` for SD1.x / SDXL)
    pipe: Any
    module: nn.Module

    def export_lora(self, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
        save_pipeline_lora(type(self.pipe), state, lora_config, out, component=self.TRAINED)

    def export_full(self, out: Path) -> None:
        save_pipeline_folder(self.pipe, {self.TRAINED: self.module}, out)


def save_pipeline_lora(pipeline_cls: Any, state: dict[str, Tensor], lora_config: dict, out: Path,
                       component: str = "transformer", weight_name: str | None = None) -> None:
    """A LoRA file that ``pipeline_cls.load_lora_weights`` loads, written by the pipeline's own
    ``save_lora_weights``: the ``transformer.`` (or ``unet.``) prefix, ``pytorch_lora_weights.safetensors``, the
    LoraConfig as metadata (FLUX, SD3, Wan, Qwen-Image, HunyuanVideo; SD1.x and SDXL with ``component="unet"``).

    Args:
        pipeline_cls: The family's diffusers pipeline class (``FluxPipeline``, ``StableDiffusion3Pipeline``, ...).
        state: peft adapter state of the transformer (``get_peft_model_state_dict`` keys), scaling folded in
            (``flowgrove.runs.export.folded_lora``).
        lora_config: ``LoraConfig`` keyword arguments that match ``state`` (stored in the file's metadata).
        out: The folder to write.
        component: The trained component's name in ``save_lora_weights`` (``transformer`` or ``unet``).
        weight_name: The file's name (None: diffusers' ``pytorch_lora_weights.safetensors``).
    """
    pipeline_cls.save_lora_weights(str(out), weight_name=weight_name, **{f"{component}_lora_layers": state,
                                                                         f"{component}_lora_adapter_metadata": lora_config})


def save_pipeline_folder(pipe: Any, modules: Mapping[str, nn.Module], out: Path) -> None:
    """A pipeline folder in ``out``: the base folder's other components copied, each trained module of ``modules``
    (component name -> module, e.g. ``{"transformer": ...}``) written with ``save_pretrained`` into
    ``out/<component>`` (``from_pretrained(out)`` loads the pipeline, the transformer class's
    ``from_pretrained(out, subfolder=component)`` the transformer).

    Raises:
        FileNotFoundError: the base folder the pipeline was loaded from (``policy.path``) is gone.
    """
    source = Path(pipe.name_or_path or "")
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"the base {type(pipe).__name__} folder {str(source)!r} (policy.path) is gone; export "
                                "needs it for the pipeline's other components: restore it or set policy.path")
    for entry in source.iterdir():
        if entry.name not in modules:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, out / entry.name)
    for component, module in modules.items():
        module.save_pretrained(str(out / component))
