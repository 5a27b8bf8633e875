"""SD3 adapter: Stable Diffusion 3 / 3.5 through the components of diffusers' ``StableDiffusion3Pipeline``.

Three text encoders (CLIP-L, CLIP-G, T5) through ``StableDiffusion3Pipeline.encode_prompt``; latents ``[B, 16,
H/8, W/8]`` go to ``SD3Transformer2DModel`` unpacked (the transformer patches them itself).
Timestep convention: ``StableDiffusion3Pipeline.__call__`` passes the scheduler's ``timesteps`` =
``sigmas * num_train_timesteps`` (1000) unchanged to the transformer, whose sinusoidal embedding takes them as
they are, so the model sees ``1000 * sigma``. The adapter feeds ``sigma * num_train_timesteps`` from the exact
float ``sigma`` (the same float32 product as the scheduler's, never quantised).

Classifier-free guidance lives inside :meth:`SD3Policy.velocity`, as in the pipeline's denoising loop: one
transformer call on the concatenated ``[uncond; cond]`` batch, then ``v_u + s * (v_c - v_u)``. That guided
velocity is the policy's mean, so rollouts and the training re-score (Flow-GRPO's ``train.cfg``) both run both
branches; gradients reach the weights through both unless ``detach_uncond`` (Flow-GRPO's training forward
detaches the unconditional branch). ``guidance_scale <= 1`` is the no-CFG mode (diffusers'
``do_classifier_free_guidance = guidance_scale > 1``): one call on the conditional batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import per_sample_sigma, vae_decode
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, SizeRule, check_folder_size, check_size,
                                          load_local_pipeline, local_folder, vae_scale)

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline


def sd3_size_rule(configs: Mapping[str, Mapping]) -> SizeRule:
    """SD3 (``configs["vae"]``, ``configs["transformer"]``): sides are multiples of the VAE scale times the
    transformer's patch size (the pipeline's ``check_inputs``)."""
    scale, patch = vae_scale(configs["vae"]), int(configs["transformer"]["patch_size"])
    return SizeRule(scale * patch, f"VAE scale {scale} x patch size {patch}")


class SD3Policy(PipelineExports):
    """A diffusers SD3 / SD3.5 pipeline as a ``FlowPolicy``, with classifier-free guidance in ``velocity``.

    Attributes:
        guidance_scale: CFG scale ``s``; CFG is on when ``s > 1``.
        detach_uncond: Stop gradients through the unconditional branch (Flow-GRPO's training forward).
        negative: ``(negative_prompt_embeds [1, L, D], negative_pooled [1, P])`` of ``negative_prompt``, encoded
            once at construction (None without CFG); used for conditioning without negative fields (a prompt cache).
    """

    def __init__(self, pipe: StableDiffusion3Pipeline, guidance_scale: float, height: int, width: int,
                 max_sequence_length: int, negative_prompt: str = "", detach_uncond: bool = False,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.guidance_scale = float(guidance_scale)
        self.detach_uncond = bool(detach_uncond)
        self.max_sequence_length = int(max_sequence_length)
        self.compute_dtype = compute_dtype  # bf16/fp16: the forward runs under autocast over float32 master weights
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        rule = sd3_size_rule({"vae": pipe.vae.config, "transformer": pipe.transformer.config})
        check_size("sd3", rule, height, width)
        scale = vae_scale(pipe.vae.config)
        self.latent_shape = (int(pipe.transformer.config.in_channels), int(height) // scale, int(width) // scale)
        self.negative = self._encode(["" if negative_prompt is None else str(negative_prompt)]) if self.cfg else None

    @property
    def cfg(self) -> bool:
        """Whether ``velocity`` guides (``guidance_scale > 1``, as diffusers decides)."""
        return self.guidance_scale > 1

    @property
    def module(self) -> nn.Module:
        """The transformer ``velocity`` calls (and the trainer trains; FSDP2 shards it in place)."""
        return self.transformer

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.transformer = value

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        device = self.pipe.text_encoder.device
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )  # [B, 77 + max_sequence_length, D], [B, P]: CLIP-L|CLIP-G tokens (padded to D) then T5 tokens
        return embeds, pooled

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """CLIP-L, CLIP-G and T5 embeddings through ``StableDiffusion3Pipeline.encode_prompt`` (no grad); with CFG
        the negative prompt's embeddings are repeated into the negative fields, one row per prompt."""
        embeds, pooled = self._encode(list(prompts))
        if self.negative is None:
            return Conditioning(embeds, pooled)
        b = embeds.shape[0]
        neg, neg_pooled = (t.to(embeds.device).expand(b, *t.shape[1:]).contiguous() for t in self.negative)
        return Conditioning(embeds, pooled, neg, neg_pooled)

    def _negatives(self, cond: Conditioning, b: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if cond.negative_prompt_embeds is not None and cond.negative_pooled is not None:
            return cond.negative_prompt_embeds, cond.negative_pooled
        if self.negative is None:
            raise ValueError("sd3: guidance needs negative_prompt_embeds and negative_pooled in the conditioning")
        neg, neg_pooled = (t.to(device).expand(b, *t.shape[1:]) for t in self.negative)  # [B, L, D], [B, P]
        return neg, neg_pooled

    def _forward(self, x: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights; log-probs stay float32 outside
            return self.transformer(
                hidden_states=x.to(dtype),  # [N, C, H, W]
                encoder_hidden_states=embeds.to(dtype),  # [N, L, D]
                pooled_projections=pooled.to(dtype),  # [N, P]
                timestep=sigma * self.num_train_timesteps,  # [N]: 1000 * sigma, as the pipeline (module docstring)
                return_dict=False,
            )[0]  # [N, C, H, W]

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` at latents ``x`` and noise levels ``sigma``, guided when CFG is on.

        Args:
            x: Latents ``[B, C, H, W]``.
            sigma: Noise levels ``[B]`` (or a scalar for all rows), 1 = noise.
            cond: Conditioning with ``B`` rows (negative fields: the unconditional branch; without them the
                policy's own negative prompt).

        Returns:
            ``v_u + s * (v_c - v_u)`` (CFG) or ``v_c`` (no CFG), ``[B, C, H, W]`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        if cond.pooled is None:
            raise ValueError("sd3 needs pooled embeddings (CLIP-L|CLIP-G); encode the prompts with this policy.")
        sigma = per_sample_sigma(sigma, b, x.device).float()  # [B]
        if not self.cfg:
            return self._forward(x, sigma, cond.prompt_embeds, cond.pooled).to(x.dtype)  # [B, C, H, W]
        neg, neg_pooled = self._negatives(cond, b, x.device)
        if neg.shape[1:] != cond.prompt_embeds.shape[1:]:
            raise ValueError(f"sd3: negative_prompt_embeds {tuple(neg.shape)} and prompt_embeds "
                             f"{tuple(cond.prompt_embeds.shape)} differ; encode both with the same max_sequence_length.")
        out = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([neg.to(cond.prompt_embeds), cond.prompt_embeds]),
                            torch.cat([neg_pooled.to(cond.pooled), cond.pooled])).float()  # [2B, C, H, W]
        v_uncond, v_cond = out.chunk(2)  # [B, C, H, W] each: the pipeline's order, negative first
        if self.detach_uncond:
            v_uncond = v_uncond.detach()
        return (v_uncond + self.guidance_scale * (v_cond - v_uncond)).to(x.dtype)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H', W']`` in [0, 1]: ``x / scaling_factor + shift_factor`` through the VAE, as the
        pipeline (``vae_decode``)."""
        return vae_decode(self.pipe.vae, x)  # [B, 3, H', W']

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3):
            if encoder is not None:
                encoder.to("cpu")


SD3_FOLDER = LocalFolder("sd3", "SD3/SD3.5", "`hf download stabilityai/stable-diffusion-3.5-medium --local-dir "
                         "/models/sd3.5-medium` (accept the licence on huggingface.co and log in first)")


@register_policy("sd3", SD3_FOLDER)
def build_sd3_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                     guidance_scale: float = 4.5, negative_prompt: str = "", detach_uncond: bool = False,
                     height: int = 512, width: int = 512, max_sequence_length: int = 256) -> SD3Policy:
    """Load a local diffusers SD3 / SD3.5 folder offline (``StableDiffusion3Pipeline.from_pretrained``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer, vae, three text encoders, tokenizers).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        guidance_scale: CFG scale in rollouts and training (Flow-GRPO 4.5); ``<= 1`` turns CFG off.
        negative_prompt: The unconditional branch's prompt (Flow-GRPO: the empty string).
        detach_uncond: No gradients through the unconditional branch (Flow-GRPO's training forward).
        height: Image height in pixels, a multiple of 16 (:func:`sd3_size_rule`); sets ``latent_shape``.
        width: Image width in pixels, likewise.
        max_sequence_length: T5 tokens per prompt (diffusers 256; Flow-GRPO 128).

    Returns:
        The policy; its text encoders and VAE are frozen.
    """
    from diffusers import StableDiffusion3Pipeline

    folder = local_folder(path, SD3_FOLDER, dtype)
    check_folder_size(folder, "sd3", sd3_size_rule, ("vae", "transformer"), height, width)  # before any weights load
    pipe = load_local_pipeline(StableDiffusion3Pipeline, path, SD3_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder", "text_encoder_2", "text_encoder_3"))
    return SD3Policy(pipe, guidance_scale, height, width, max_sequence_length, negative_prompt, detach_uncond,
                     compute_dtype=DTYPES[dtype])
