"""Random FLUX-shaped models and inputs for ``flowgrove bench-model``: shipped diffusers configs, no weights.

``flowgrove/assets`` holds FLUX.1-dev's transformer and VAE configs and tiny ones of the same architecture
(``--tiny``). Modules are built with random weights directly on the device; prompt embeddings are random tensors of
FLUX's shapes (T5 ``[B, 512, 4096]``, pooled CLIP ``[B, 768]``), so no text encoder is needed.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning
from flowgrove.policies.flux import FluxAdapter, vae_decode
from flowgrove.tasks.digits import assets_dir


@dataclass(frozen=True)
class ModelSpec:
    """What bench-model builds: diffusers configs of the transformer and the VAE, and the prompt shapes."""

    name: str
    transformer: dict  # FluxTransformer2DModel keyword arguments
    vae: dict  # AutoencoderKL keyword arguments
    text_tokens: int  # T5 tokens per prompt (FLUX.1-dev: max_sequence_length 512)


def read_config(name: str) -> dict:
    """A shipped diffusers config (``flowgrove/assets/<name>.json``) without its ``_``-prefixed keys."""
    data = json.loads((assets_dir() / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def model_spec(tiny: bool) -> ModelSpec:
    """FLUX.1-dev's transformer and VAE configs, or the tiny ones of the same architecture (``--tiny``)."""
    if tiny:
        return ModelSpec("flux-tiny", read_config("flux_tiny_transformer"), read_config("flux_tiny_vae"), text_tokens=8)
    return ModelSpec("flux1-dev", read_config("flux1_dev_transformer"), read_config("flux1_dev_vae"), text_tokens=512)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_random(cls: type, config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``cls(**config)`` with random weights created directly on ``device`` in ``dtype`` (no float32 host copy)."""
    with torch.device(device), _default_dtype(dtype):
        module = cls(**config)
    cast_parameters(module, dtype)  # a module that fixes its own dtype still ends up in dtype
    return module.requires_grad_(False).eval()


def latent_side(resolution: int, vae_config: dict) -> int:
    """Latent side of a square image, as ``FluxPipeline.prepare_latents``: ``2 * (pixels // (vae_scale * 2))``."""
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    side = 2 * (resolution // (vae_scale * 2))
    if side < 2:
        raise ValueError(f"resolution {resolution} is below one 2x2 latent patch ({vae_scale * 2} pixels)")
    return side


def random_conditioning(batch: int, spec: ModelSpec, device: torch.device, generator: torch.Generator) -> Conditioning:
    """Random prompt embeddings of FLUX's shapes: T5 ``[B, L, joint_attention_dim]``, pooled CLIP ``[B, P]``."""
    t = spec.transformer
    embeds = torch.randn(batch, spec.text_tokens, t["joint_attention_dim"], generator=generator)  # [B, L, D]
    pooled = torch.randn(batch, t["pooled_projection_dim"], generator=generator)  # [B, P]
    return Conditioning(embeds, pooled).to(device)


def random_latents(batch: int, side: int, spec: ModelSpec, device: torch.device, generator: torch.Generator) -> Tensor:
    """Float32 latents ``[B, C, H, W]`` (rollouts keep latents in float32), C = in_channels / 4 (2x2 packing)."""
    channels = spec.transformer["in_channels"] // 4
    return torch.randn(batch, channels, side, side, generator=generator).to(device)  # [B, C, H, W]


class BenchPolicy:
    """What ``rescore`` and ``apply_lora`` use of a ``FlowPolicy`` (``module``, ``velocity``, ``decode``) over a
    random FLUX transformer (through ``FluxAdapter``) and VAE; prompts are random, latent sizes vary by row."""

    def __init__(self, adapter: FluxAdapter, vae: nn.Module | None) -> None:
        self.adapter = adapter
        self.vae = vae

    @property
    def module(self) -> nn.Module:  # read-only: nothing here wraps the transformer (no DDP)
        return self.adapter.transformer

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError("bench-model uses random prompt embeddings (random_conditioning)")

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.adapter.velocity(x, sigma, cond)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        return vae_decode(self.vae, x)  # [B, 3, H', W']


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter in ``dtype``, in place (as ``float32_masters``; ``ModelMixin.to`` warns about dtypes)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)


def model_parameters(spec: ModelSpec) -> dict[str, int]:
    """Parameter counts of the transformer and the VAE, from models built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in cls(**cfg).parameters())
                  for name, cls, cfg in (("transformer", FluxTransformer2DModel, spec.transformer),
                                         ("vae", AutoencoderKL, spec.vae))}
    return counts
