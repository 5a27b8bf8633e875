"""Loading a local diffusers pipeline folder offline, shared by the families' factories (flux1, sd3, ...).

Light to import: diffusers is imported by the caller, which passes its pipeline class.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_local_pipeline(pipeline_cls: Any, path: str, *, dtype: str, device: str | torch.device, family: str,
                        folder: str, download: str, frozen: Sequence[str], float32_vae: Any = None) -> Any:
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` in ``dtype`` on ``device``, ``frozen``
    components in eval mode without gradients.

    Args:
        pipeline_cls: The diffusers pipeline class (``FluxPipeline``, ``StableDiffusion3Pipeline``, ...).
        path: The folder with ``model_index.json``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        device: Where every component goes.
        family: The policy name, for the errors (``flux1``).
        folder: What the folder holds, for the errors (``FLUX.1``).
        download: How to get it, for the errors: the text after "Download it first, e.g. ".
        frozen: Names of the components to freeze (text encoders, VAE); absent or None ones are skipped.
        float32_vae: A VAE class to load from ``path/vae`` in float32 (Wan, Qwen-Image), as diffusers' examples do.

    Raises:
        ValueError: an unknown ``dtype``.
        FileNotFoundError: ``path`` is not a diffusers folder; the message says what to download.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if not path or not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{family} needs a local diffusers {folder} folder (with model_index.json), but {str(path) or '<empty path>'!r} "
            f"is not one. Download it first, e.g. {download}, then set policy.path to it."
        )
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
