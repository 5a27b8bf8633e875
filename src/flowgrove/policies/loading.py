"""Loading a local diffusers pipeline folder offline, shared by the adapters of VAE-latent families (wan, qwen_image)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from flowgrove.policies.flux import DTYPES


def load_local_pipeline(pipeline_cls: type, vae_cls: type, path: str, dtype: str, device: str | torch.device,
                        missing: str):
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` in ``dtype``, with a float32 VAE, on ``device``.

    Args:
        pipeline_cls: The diffusers pipeline class.
        vae_cls: Its VAE class (loaded from ``path/vae`` in float32, as diffusers' examples do).
        path: The folder with ``model_index.json``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for every other component.
        device: Where every component goes.
        missing: The message of the ``FileNotFoundError`` when ``path`` is no such folder (what to download).

    Returns:
        The pipeline.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if not path or not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(missing)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        vae = vae_cls.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        pipe = pipeline_cls.from_pretrained(str(path), vae=vae, torch_dtype=DTYPES[dtype], local_files_only=True)
    return pipe.to(device)


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
