"""FLUX.1 Kontext adapter: image editing with FLUX.1's transformer (diffusers ``FluxKontextPipeline``).

Everything of ``flux1`` holds (packing, ids, the exact-``sigma`` timestep, guidance embedding, CLIP + T5 text,
decoding, exports); Kontext adds the prompt row's input image. It is encoded once per prompt with the text
(``encode_prompts``: ``VaeImageProcessor.preprocess`` to the policy's ``height x width``, the pipeline's own
``_encode_vae_image`` (the VAE's mode, shifted and scaled), packed into 2x2 tokens) and kept in
``Conditioning.image_latents`` ``[B, HW/4, 4C]`` (so ``encode-prompts`` caches it); at every step
``FluxAdapter.velocity`` appends those tokens to the latent's with position ids ``(1, row, col)`` and keeps the
latent's part of the output (``FluxKontextPipeline.__call__``'s ``torch.cat([latents, image_latents], dim=1)`` and
``noise_pred[:, : latents.size(1)]``).

Sizes: the pipeline scales the output to ``max_area`` (1024^2 by default) and, with ``_auto_resize``, the input
image to the nearest of Kontext's preferred resolutions. The policy keeps ``height x width`` for both (one token
count per batch, so rows stack and cache): it equals the pipeline called with ``max_area=height * width`` and
``_auto_resize=False`` on an input image of that size. Pick ``height``/``width`` from Kontext's preferred
resolutions (``PREFERRED_KONTEXT_RESOLUTIONS``, e.g. 1024x1024, 1184x880) for the model's best quality.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import Flux1Policy, load_flux1_family, pack_latents
from flowgrove.policies.pipelines import LocalFolder, input_images


class FluxKontextPolicy(Flux1Policy):
    """A diffusers FLUX.1 Kontext pipeline as a ``FlowPolicy``: ``flux1`` conditioned on each prompt's input image."""

    FAMILY = "flux_kontext"

    def __init__(self, pipe: Any, guidance: float | None, height: int, width: int, max_sequence_length: int,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(pipe, guidance, height, width, max_sequence_length, compute_dtype)
        self.height, self.width = int(height), int(width)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """Packed VAE tokens ``[B, HW/4, 4C]`` of PIL ``images`` resized to ``height x width`` (no grad)."""
        pipe = self.pipe
        pixels = pipe.image_processor.preprocess(list(images), height=self.height, width=self.width)  # [B, 3, H', W']
        with torch.no_grad():
            latents = pipe._encode_vae_image(pixels.to(pipe.vae.device, pipe.vae.dtype), generator=None)  # [B, C, H, W]
        return pack_latents(latents)  # [B, HW/4, 4C]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``flux1``'s text conditioning plus each prompt's input image (``prompt.metadata["image"]``) as VAE tokens.

        Raises:
            ValueError: a prompt without an input image.
        """
        images = input_images(prompts, self.FAMILY)  # before the text encoders run
        return dataclasses.replace(super().encode_prompts(prompts), image_latents=self.encode_images(images))


KONTEXT_FOLDER = LocalFolder("flux_kontext", "FLUX.1 Kontext", "`hf download black-forest-labs/FLUX.1-Kontext-dev "
                             "--local-dir /models/FLUX.1-Kontext-dev` (accept the licence on huggingface.co and log "
                             "in first)", input_images="*")


@register_policy("flux_kontext", KONTEXT_FOLDER)
def build_flux_kontext_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                              guidance: float | None = 2.5, height: int = 1024, width: int = 1024,
                              max_sequence_length: int = 512) -> FluxKontextPolicy:
    """Load a local diffusers FLUX.1 Kontext folder offline (``FluxKontextPipeline.from_pretrained``); the options
    are :func:`flowgrove.policies.flux.build_flux1_policy`'s, with the pipeline's default ``guidance`` 2.5 and
    ``height`` / ``width`` sizing the input images too (module docstring)."""
    from diffusers import FluxKontextPipeline

    return load_flux1_family(FluxKontextPipeline, FluxKontextPolicy, KONTEXT_FOLDER, path, device, dtype, guidance,
                             height, width, max_sequence_length)
