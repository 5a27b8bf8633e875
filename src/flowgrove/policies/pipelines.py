"""Loading a local diffusers pipeline folder offline, and the helpers the families share (decoding, text padding,
exports).

Light to import: diffusers is imported by the caller, which passes its pipeline class.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import PipelineFolder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_local_pipeline(pipeline_cls: Any, path: str, folder: PipelineFolder, *, dtype: str,
                        device: str | torch.device, frozen: Sequence[str], float32_vae: Any = None) -> Any:
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` in ``dtype`` on ``device``, ``frozen``
    components in eval mode without gradients.

    Args:
        pipeline_cls: The diffusers pipeline class (``FluxPipeline``, ``StableDiffusion3Pipeline``, ...).
        path: The folder with ``model_index.json``.
        folder: The family's folder record (its name, what the folder holds, how to download it), for the errors.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        device: Where every component goes.
        frozen: Names of the components to freeze (text encoders, VAE); absent or None ones are skipped.
        float32_vae: A VAE class to load from ``path/vae`` in float32 (Wan, Qwen-Image), as diffusers' examples do.

    Raises:
        ValueError: an unknown ``dtype``.
        FileNotFoundError: ``path`` is not a diffusers folder; the message says what to download.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    folder.check(path)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        extra = {}
        if float32_vae is not None:
            extra["vae"] = float32_vae.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        pipe = pipeline_cls.from_pretrained(str(path), torch_dtype=DTYPES[dtype], local_files_only=True, **extra)
    pipe.to(device)
    for name in frozen:
        component = getattr(pipe, name, None)
        if component is not None:
            component.requires_grad_(False).eval()
    return pipe


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


def unet_latent_shape(pipe: Any, height: int, width: int, family: str) -> tuple[int, int, int]:
    """``(C, H / f, W / f)`` of an SD1.x / SDXL latent, ``f`` the VAE scale ``2 ** (len(block_out_channels) - 1)``.

    Raises:
        ValueError: ``height`` or ``width`` is not a multiple of ``f``.
    """
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if int(height) % scale or int(width) % scale:
        raise ValueError(f"{family}: height and width must be multiples of the VAE scale {scale}, got {height}x{width}.")
    return (int(pipe.unet.config.in_channels), int(height) // scale, int(width) // scale)


def save_pipeline_lora(pipeline_cls: Any, state: dict[str, Tensor], lora_config: dict, out: Path,
                       component: str = "transformer") -> None:
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
    """
    pipeline_cls.save_lora_weights(str(out), **{f"{component}_lora_layers": state,
                                                f"{component}_lora_adapter_metadata": lora_config})


def save_pipeline_folder(pipe: Any, module: nn.Module, out: Path, subfolder: str = "transformer") -> None:
    """A pipeline folder in ``out``: the base folder's other components copied, the trained ``module`` written with
    ``save_pretrained`` into ``out/subfolder`` (``from_pretrained(out)`` loads the pipeline, the transformer class's
    ``from_pretrained(out, subfolder=subfolder)`` the transformer).

    Raises:
        FileNotFoundError: the base folder the pipeline was loaded from (``policy.path``) is gone.
    """
    source = Path(pipe.name_or_path or "")
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"the base {type(pipe).__name__} folder {str(source)!r} (policy.path) is gone; export "
                                "needs it for the pipeline's other components: restore it or set policy.path")
    for entry in source.iterdir():
        if entry.name != subfolder:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, out / entry.name)
    module.save_pretrained(str(out / subfolder))
