"""SDXL adapter: Stable Diffusion XL through ``StableDiffusionXLPipeline``'s parts (a diffusion model, as ``sd15``).

Like :mod:`flowgrove.policies.sd15`: ``velocity`` returns the UNet's output (``eps`` or ``v``), the policy's
``step_family`` is DDIM with eta (and DPM-Solver++(2M) tails) on the noise table of the folder's scheduler
config (SDXL base ships ``EulerDiscreteScheduler``; :func:`~flowgrove.policies.sd15.ddim_schedule`, ending at
``alphas_cumprod[0]``), and the UNet sees ``tau = sigma * T - 1`` (the trailing DDIM grid). What SDXL adds, as
``StableDiffusionXLPipeline.__call__`` builds it:

- two text encoders: ``encode_prompt`` concatenates the penultimate hidden states of ``CLIPTextModel`` and
  ``CLIPTextModelWithProjection`` (``prompt_embeds [B, 77, D1 + D2]``) and takes the projected pooled embedding
  of the second (``pooled [B, P]``, the UNet's ``added_cond_kwargs["text_embeds"]``);
- the size / crop micro-conditioning ``add_time_ids = original_size + crops_coords_top_left + target_size``
  (``pipe._get_add_time_ids``, ``[1, 6]``), the same for both CFG branches, as the pipeline's default;
- the unconditional branch: zeros when ``negative_prompt`` is None and the pipeline's
  ``force_zeros_for_empty_prompt`` is set (SDXL base), else the encoded ``negative_prompt``.

Classifier-free guidance lives in ``velocity`` as in the pipeline's loop: one UNet call on ``[uncond; cond]``, then
``e_u + s * (e_c - e_u)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import per_sample_sigma
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, decode_sd_vae, load_local_pipeline,
                                          unet_latent_shape)
from flowgrove.policies.sd15 import ddim_schedule, folder_schedule
from flowgrove.samplers.family import DiffusionSchedule, diffusion_steps

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline


def sdxl_time_ids(pipe: StableDiffusionXLPipeline, height: int, width: int, original_size: Sequence[int] | None = None,
                  crops_coords_top_left: Sequence[int] = (0, 0)) -> Tensor:
    """``add_time_ids [1, 6]`` float32 as ``StableDiffusionXLPipeline.__call__`` builds them (``_get_add_time_ids``,
    which checks them against the UNet's ``add_embedding``): ``original_size`` (default the target size),
    ``crops_coords_top_left``, then the target size ``(height, width)``."""
    target = (int(height), int(width))
    original = tuple(int(n) for n in original_size) if original_size is not None else target
    return pipe._get_add_time_ids(original, tuple(int(n) for n in crops_coords_top_left), target, dtype=torch.float32,
                                  text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim))


class SDXLPolicy(PipelineExports):
    """A diffusers ``StableDiffusionXLPipeline`` as a policy of the diffusion step family, with CFG in ``velocity``.

    Attributes:
        step_family: DDIM-with-eta steps on the folder's noise table (what rollouts and re-scores use).
        schedule: The noise table and prediction type.
        guidance_scale: CFG scale ``s``.
        cfg: Whether ``velocity`` guides (``s > 1``).
        module: The UNet ``velocity`` calls (FSDP2 shards it in place).
        time_ids: ``add_time_ids [1, 6]`` (sizes and crop, :func:`sdxl_time_ids`).
        negative: ``(prompt_embeds [1, L, D], pooled [1, P])`` of the unconditional branch (None without CFG).
    """

    TRAINED = "unet"

    def __init__(self, pipe: StableDiffusionXLPipeline, guidance_scale: float, height: int, width: int,
                 negative_prompt: str | None = None, time_ids: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32, schedule: DiffusionSchedule | None = None) -> None:
        self.pipe = pipe
        self.module = pipe.unet  # what velocity calls and the trainer trains
        self.guidance_scale = float(guidance_scale)
        self.cfg = self.guidance_scale > 1  # as diffusers decides
        self.compute_dtype = compute_dtype
        self.schedule = ddim_schedule(dict(pipe.scheduler.config)) if schedule is None else schedule
        self.step_family = diffusion_steps(self.schedule)
        self.latent_shape = unet_latent_shape(pipe, height, width, "sdxl")
        self.time_ids = sdxl_time_ids(pipe, height, width) if time_ids is None else time_ids  # [1, 6]
        self.negative = self._negative(negative_prompt) if self.cfg else None

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe.text_encoder_2.device,
                                                           num_images_per_prompt=1, do_classifier_free_guidance=False)
        return embeds, pooled  # [B, 77, D1 + D2] penultimate CLIP states, [B, P] projected pooled

    def _negative(self, negative_prompt: str | None) -> tuple[Tensor, Tensor]:
        if negative_prompt is None and self.pipe.config.force_zeros_for_empty_prompt:
            embeds, pooled = self._encode([""])
            return torch.zeros_like(embeds), torch.zeros_like(pooled)  # the pipeline's zeroed negative
        return self._encode(["" if negative_prompt is None else str(negative_prompt)])

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Both CLIP encoders through ``StableDiffusionXLPipeline.encode_prompt`` (no grad); with CFG the
        unconditional branch fills the negative fields, one row per prompt."""
        embeds, pooled = self._encode(list(prompts))
        if self.negative is None:
            return Conditioning(embeds, pooled)
        rows = embeds.shape[0]
        neg, neg_pooled = (t.to(embeds.device).expand(rows, *t.shape[1:]).contiguous() for t in self.negative)
        return Conditioning(embeds, pooled, negative_prompt_embeds=neg, negative_pooled=neg_pooled)

    def _forward(self, x: Tensor, timestep: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        dtype = next(self.module.parameters()).dtype
        added = {"text_embeds": pooled.to(dtype), "time_ids": self.time_ids.to(x.device, dtype).expand(x.shape[0], -1)}
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:
            return self.module(x.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added,
                             return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """The UNet's output (``eps`` or ``v``, see ``schedule.prediction_type``), guided when CFG is on.

        Args:
            x: Latents ``[B, C, H, W]`` (variance-preserving, ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``).
            sigma: Timestep fractions ``[B]`` (or a scalar); the UNet sees ``sigma * 1000 - 1``.
            cond: Conditioning with ``B`` rows: ``prompt_embeds``, ``pooled`` (negative fields: the unconditional
                branch, else the policy's own).

        Returns:
            ``e_u + s * (e_c - e_u)`` (CFG) or ``e_c``, ``[B, C, H, W]`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b or cond.pooled is None:
            raise ValueError(f"cond must have {b} rows with pooled embeddings (SDXLPolicy.encode_prompts), "
                             f"got {len(cond)}.")
        timestep = self.schedule.timestep(per_sample_sigma(sigma, b, x.device)).float()  # [B]
        if not self.cfg:
            return self._forward(x, timestep, cond.prompt_embeds, cond.pooled).to(x.dtype)  # [B, C, H, W]
        neg, neg_pooled = cond.negative_prompt_embeds, cond.negative_pooled
        if neg is None or neg_pooled is None:
            neg, neg_pooled = (t.to(x.device).expand(b, *t.shape[1:]) for t in self.negative)  # [B, L, D], [B, P]
        out = self._forward(torch.cat([x, x]), torch.cat([timestep, timestep]),
                            torch.cat([neg.to(cond.prompt_embeds), cond.prompt_embeds]),
                            torch.cat([neg_pooled.to(cond.pooled), cond.pooled])).float()  # [2B, C, H, W]
        e_uncond, e_cond = out.chunk(2)  # the pipeline's order, negative first
        return (e_uncond + self.guidance_scale * (e_cond - e_uncond)).to(x.dtype)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H', W']`` in [0, 1], decoded as the pipeline (``decode_sd_vae``; the VAE is float32)."""
        return decode_sd_vae(self.pipe.vae, x).to(x.dtype)

    def offload_text_encoders(self) -> None:
        """Move both text encoders to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")
        self.pipe.text_encoder_2.to("cpu")


SDXL_FOLDER = LocalFolder("sdxl", "Stable Diffusion XL",
                           "`hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir /models/sdxl`")


@register_policy("sdxl", SDXL_FOLDER, family="diffusion")
def build_sdxl_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "float32",
                      guidance_scale: float = 5.0, negative_prompt: str | None = None, height: int = 1024,
                      width: int = 1024, original_size: list[int] | None = None,
                      crops_coords_top_left: list[int] = (0, 0)) -> SDXLPolicy:
    """Load a local diffusers SDXL folder offline (``StableDiffusionXLPipeline.from_pretrained``).

    Args:
        path: The diffusers folder (``model_index.json``, unet, vae, text_encoder(_2), tokenizer(_2), scheduler).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the UNet and text encoders; the VAE stays float32
            (SDXL's VAE overflows in float16; the pipeline upcasts it, ``force_upcast``).
        guidance_scale: CFG scale in rollouts and training (the pipeline's 5.0); ``<= 1`` turns CFG off.
        negative_prompt: The unconditional branch's prompt; None: zeros (``force_zeros_for_empty_prompt``).
        height: Image height in pixels, a multiple of the VAE scale (8); sets ``latent_shape`` and the time
            ids' target size.
        width: Image width in pixels.
        original_size: The time ids' original size ``[h, w]``; None: ``[height, width]``, as the pipeline.
        crops_coords_top_left: The time ids' crop ``[top, left]`` (the pipeline's ``(0, 0)``).

    Returns:
        The policy; its text encoders and VAE are frozen.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    schedule = folder_schedule(path, SDXL_FOLDER, dtype, height, width)  # before any weights load
    pipe = load_local_pipeline(StableDiffusionXLPipeline, path, SDXL_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder", "text_encoder_2"), float32_vae=AutoencoderKL)
    time_ids = sdxl_time_ids(pipe, height, width, original_size, crops_coords_top_left)
    return SDXLPolicy(pipe, guidance_scale, height, width, negative_prompt, time_ids, compute_dtype=DTYPES[dtype],
                      schedule=schedule)
