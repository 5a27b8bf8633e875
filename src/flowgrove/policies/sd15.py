"""SD1.x adapter: Stable Diffusion 1.4 / 1.5 (and 2.x, v-prediction) through ``StableDiffusionPipeline``'s parts.

A diffusion model, not a rectified flow: ``velocity`` returns the UNet's output (``eps``, or ``v`` for
``prediction_type="v_prediction"``), and the policy's ``step_family`` (DDIM with eta, DPM-Solver++(2M) tails;
:mod:`flowgrove.samplers.family`) tells rollouts and the re-score what it means. The rollout coordinate
``sigma`` in [0, 1] is a timestep fraction: the UNet sees ``tau = sigma * T - 1`` (``T = 1000``), so the grid
``linspace(1, 0, N + 1)`` is diffusers' ``timestep_spacing="trailing"`` DDIM grid ``[999, 999 - 1000/N, ...]``
and the last step goes to the scheduler's final ``alphas_cumprod`` (``set_alpha_to_one``). The noise table is the
one ``DDIMScheduler.from_config(pipe.scheduler.config)`` builds (beta schedule, zero-terminal-SNR rescale).

Classifier-free guidance lives in :meth:`SD15Policy.velocity` as in the pipeline's loop (DanceGRPO's SD recipe,
CFG 5.0): one UNet call on ``[uncond; cond]``, then ``e_u + s * (e_c - e_u)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import per_sample_sigma
from flowgrove.policies.pipelines import (DTYPES, decode_sd_vae, load_local_pipeline, save_pipeline_folder,
                                         save_pipeline_lora, unet_latent_shape)
from flowgrove.samplers.family import DiffusionSchedule, diffusion_steps

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def ddim_schedule(scheduler_config: dict) -> DiffusionSchedule:
    """The noise table of ``DDIMScheduler.from_config(scheduler_config)`` (so every beta schedule and the
    zero-terminal-SNR rescale are diffusers' own) and its prediction type."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    return DiffusionSchedule(ddim.alphas_cumprod.clone(), float(ddim.final_alpha_cumprod),
                             str(ddim.config.prediction_type))


class SD15Policy:
    """A diffusers ``StableDiffusionPipeline`` as a policy of the diffusion step family, with CFG in ``velocity``.

    Attributes:
        step_family: DDIM-with-eta steps on the pipeline's schedule (what rollouts and re-scores use).
        schedule: The noise table and prediction type.
        guidance_scale: CFG scale ``s``; CFG is on when ``s > 1``.
        negative: ``negative_prompt_embeds [1, L, D]`` of ``negative_prompt`` (None without CFG).
    """

    def __init__(self, pipe: StableDiffusionPipeline, guidance_scale: float, height: int, width: int,
                 negative_prompt: str = "", compute_dtype: torch.dtype = torch.float32) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.guidance_scale = float(guidance_scale)
        self.compute_dtype = compute_dtype
        self.schedule = ddim_schedule(dict(pipe.scheduler.config))
        self.step_family = diffusion_steps(self.schedule)
        self.latent_shape = unet_latent_shape(pipe, height, width, "sd15")
        self.negative = self._encode(["" if negative_prompt is None else str(negative_prompt)]) if self.cfg else None

    @property
    def cfg(self) -> bool:
        """Whether ``velocity`` guides (``guidance_scale > 1``, as diffusers decides)."""
        return self.guidance_scale > 1

    @property
    def module(self) -> nn.Module:
        """The UNet ``velocity`` calls (and the trainer trains; FSDP2 shards it in place)."""
        return self.unet

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.unet = value

    def _encode(self, prompts: list[str]) -> Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.pipe.text_encoder.device, 1, False)
        return embeds  # [B, 77, D] CLIP last hidden states

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """CLIP embeddings through ``StableDiffusionPipeline.encode_prompt`` (no grad); with CFG the negative
        prompt's embeddings fill the negative field, one row per prompt."""
        embeds = self._encode(list(prompts))
        if self.negative is None:
            return Conditioning(embeds)
        neg = self.negative.to(embeds.device).expand(embeds.shape[0], *self.negative.shape[1:]).contiguous()
        return Conditioning(embeds, negative_prompt_embeds=neg)

    def _forward(self, x: Tensor, timestep: Tensor, embeds: Tensor) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:
            return self.unet(x.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype), return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """The UNet's output (``eps`` or ``v``, see ``schedule.prediction_type``), guided when CFG is on.

        Args:
            x: Latents ``[B, C, H, W]`` (variance-preserving, ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``).
            sigma: Timestep fractions ``[B]`` (or a scalar); the UNet sees ``sigma * 1000 - 1``.
            cond: Conditioning with ``B`` rows (negative field: the unconditional branch).

        Returns:
            ``e_u + s * (e_c - e_u)`` (CFG) or ``e_c``, ``[B, C, H, W]`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        timestep = self.schedule.timestep(per_sample_sigma(sigma, b, x.device)).float()  # [B]
        if not self.cfg:
            return self._forward(x, timestep, cond.prompt_embeds).to(x.dtype)  # [B, C, H, W]
        neg = cond.negative_prompt_embeds
        if neg is None:
            neg = self.negative.to(x.device).expand(b, *self.negative.shape[1:])  # [B, L, D]
        out = self._forward(torch.cat([x, x]), torch.cat([timestep, timestep]),
                            torch.cat([neg.to(cond.prompt_embeds), cond.prompt_embeds])).float()  # [2B, C, H, W]
        e_uncond, e_cond = out.chunk(2)  # the pipeline's order, negative first
        return (e_uncond + self.guidance_scale * (e_cond - e_uncond)).to(x.dtype)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H', W']`` in [0, 1]: ``vae.decode(x / scaling_factor)`` as the pipeline (no shift)."""
        return decode_sd_vae(self.pipe.vae, x)

    def export_lora(self, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
        """diffusers' SD LoRA file in ``out`` (``StableDiffusionPipeline.save_lora_weights``: the ``unet.`` prefix,
        the LoraConfig as metadata), which ``pipe.load_lora_weights(out)`` loads."""
        save_pipeline_lora(type(self.pipe), state, lora_config, out, component="unet")

    def export_full(self, out: Path) -> None:
        """A pipeline folder in ``out``: the source folder's other components copied, the trained UNet written with
        ``save_pretrained`` (``StableDiffusionPipeline.from_pretrained(out)`` loads it)."""
        save_pipeline_folder(self.pipe, self.module, out, subfolder="unet")

    def offload_text_encoders(self) -> None:
        """Move the text encoder to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")


@register_policy("sd15", family="diffusion")
def build_sd15_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "float32",
                      guidance_scale: float = 5.0, negative_prompt: str = "", height: int = 512,
                      width: int = 512) -> SD15Policy:
    """Load a local diffusers SD1.x folder offline (``StableDiffusionPipeline.from_pretrained``).

    Args:
        path: The diffusers folder (``model_index.json``, unet, vae, text_encoder, tokenizer, scheduler).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        guidance_scale: CFG scale in rollouts and training (DanceGRPO's SD recipe 5.0); ``<= 1`` turns CFG off.
        negative_prompt: The unconditional branch's prompt (the empty string).
        height: Image height in pixels (sets ``latent_shape``).
        width: Image width in pixels.

    Returns:
        The policy; its text encoder and VAE are frozen.
    """
    from diffusers import StableDiffusionPipeline

    pipe = load_local_pipeline(
        StableDiffusionPipeline, path, dtype=dtype, device=device, family="sd15", folder="Stable Diffusion 1.x",
        download="`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir /models/sd15`",
        frozen=("vae", "text_encoder"),
    )
    return SD15Policy(pipe, guidance_scale, height, width, negative_prompt, compute_dtype=DTYPES[dtype])
