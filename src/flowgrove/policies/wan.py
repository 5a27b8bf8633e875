"""Wan adapter: text-to-video through diffusers ``WanPipeline`` components (Wan 2.1, Wan 2.2 T2V / TI2V).

Latents are 5-D ``[B, C, F', H', W']`` with ``F' = 1 + (F - 1) / 4`` latent frames
(``vae.config.scale_factor_temporal``) and ``H' = H / 8`` (``scale_factor_spatial``); ``F`` must be ``4k + 1`` and
``H``, ``W`` multiples of 16 (:func:`wan_size_rule`: sizes the pipeline would round are refused);
``decode`` returns videos ``[B, F, 3, H, W]`` in [0, 1].
Timestep convention: ``WanPipeline.__call__`` passes the scheduler's ``t = sigma * 1000`` unchanged to
``WanTransformer3DModel`` (0-1000 scale; per token when ``expand_timesteps``, Wan 2.2 TI2V), so the adapter feeds
the exact float ``1000 * sigma``. The transformer predicts ``noise - x0`` (the scheduler's Euler step is
``x + (sigma_next - sigma) * v``), the policy's velocity. With ``guidance_scale > 1`` the velocity is the pipeline's
classifier-free guidance ``v_neg + s * (v - v_neg)`` against ``negative_prompt``, encoded once. Wan 2.2 A14B
(``boundary_ratio``, two experts) routes rows with ``1000 * sigma >= boundary_ratio * 1000`` to ``transformer``
and the others to ``transformer_2``, as the pipeline does; ``expert`` picks which one trains (``module``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import DTYPES, per_sample_sigma
from flowgrove.policies.pipelines import (LocalFolder, SizeRule, check_folder_size, check_size, decode_wan_vae,
                                         load_local_pipeline, local_folder, save_pipeline_folder, save_pipeline_lora)

if TYPE_CHECKING:
    from diffusers import WanPipeline


def wan_size_rule(configs: Mapping[str, Mapping]) -> SizeRule:
    """Wan (``configs["vae"]``, ``configs["transformer"]``): sides are multiples of the VAE's ``scale_factor_spatial``
    times the transformer's patch, frames ``1 + scale_factor_temporal * k`` (``WanPipeline.__call__`` rounds
    others)."""
    vae, (_, patch_h, patch_w) = configs["vae"], configs["transformer"]["patch_size"]
    spatial, patch = int(vae["scale_factor_spatial"]), max(int(patch_h), int(patch_w))
    return SizeRule(spatial * patch, f"VAE scale {spatial} x patch {patch}", int(vae["scale_factor_temporal"]))


def wan_latent_shape(pipe: WanPipeline, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(C, F', H', W')`` of one latent of ``num_frames`` frames of ``height`` x ``width`` pixels.

    Raises:
        ConfigError: a size the pipeline would round (:func:`wan_size_rule`).
    """
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    check_size("wan", wan_size_rule({"vae": pipe.vae.config, "transformer": transformer.config}), height, width,
               num_frames)
    temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return (transformer.config.in_channels, (int(num_frames) - 1) // temporal + 1, int(height) // spatial,
            int(width) // spatial)


class WanPolicy:
    """A diffusers ``WanPipeline`` as a ``FlowPolicy`` on 5-D video latents (Wan-AI Wan 2.1 / 2.2)."""

    def __init__(self, pipe: WanPipeline, num_frames: int, height: int, width: int, max_sequence_length: int,
                 guidance_scale: float = 1.0, negative_prompt: str = "", expert: str = "high",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        if expert not in ("high", "low"):
            raise ValueError(f"expert must be 'high' (transformer) or 'low' (transformer_2), got {expert!r}.")
        self.pipe = pipe
        self.experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
        self.boundary = pipe.config.boundary_ratio if len(self.experts) == 2 else None
        self.trained = 1 if expert == "low" and self.boundary is not None else 0
        self.latent_shape = wan_latent_shape(pipe, num_frames, height, width)
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.compute_dtype = compute_dtype
        self._negative: Tensor | None = None  # [1, L, D], encoded on first use

    @property
    def module(self) -> nn.Module:
        """The trained transformer (``transformer``, or ``transformer_2`` with ``expert="low"``)."""
        return self.experts[self.trained]

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.experts[self.trained] = value

    def _encode(self, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
                device=self.pipe.text_encoder.device,
            )  # [B, L, D], zero past each prompt's tokens
        return embeds

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """UMT5 token states through ``WanPipeline.encode_prompt`` (no grad), zero-padded to ``max_sequence_length``."""
        if self.guidance_scale > 1 and self._negative is None:
            self._negative = self._encode([self.negative_prompt])  # [1, L, D]
        return Conditioning(self._encode(prompts))

    def _forward(self, model: nn.Module, x: Tensor, sigma: Tensor, embeds: Tensor) -> Tensor:
        dtype = next(model.parameters()).dtype
        timestep = 1000 * sigma  # [B]; WanPipeline feeds the scheduler's t = 1000 * sigma (module docstring)
        if self.pipe.config.expand_timesteps:  # Wan 2.2 TI2V: one timestep per latent token
            timestep = timestep[:, None].expand(-1, x[0, 0, :, ::2, ::2].numel())  # [B, F' * ceil(H'/2) * ceil(W'/2)]
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights
            out = model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                        return_dict=False)[0]  # [B, C, F', H', W']
        return out.to(x.dtype)

    def _expert_velocity(self, x: Tensor, sigma: Tensor, embeds: Tensor) -> Tensor:
        if self.boundary is None:
            return self._forward(self.experts[0], x, sigma, embeds)
        high = 1000 * sigma >= self.boundary * self.pipe.scheduler.config.num_train_timesteps  # [B]
        out = torch.empty_like(x)
        for expert, rows in ((0, high), (1, ~high)):
            if rows.any():
                out[rows] = self._forward(self.experts[expert], x[rows], sigma[rows], embeds[rows])
        return out  # [B, C, F', H', W']

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` of the Wan transformer, with CFG when ``guidance_scale > 1``.

        Args:
            x: Latents ``[B, C, F', H', W']``.
            sigma: Noise levels ``[B]`` (or a scalar), 1 = noise; fed as ``timestep = 1000 * sigma``.
            cond: Conditioning with ``B`` rows (``prompt_embeds [B, L, D]``).

        Returns:
            Velocity ``[B, C, F', H', W']`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        if self.guidance_scale <= 1:
            return self._expert_velocity(x, sigma, cond.prompt_embeds)
        negative = self._negative.to(cond.prompt_embeds).expand(b, -1, -1)  # [B, L, D]
        both = torch.cat([cond.prompt_embeds, negative])  # [2B, L, D]
        v, v_neg = self._expert_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return v_neg + self.guidance_scale * (v - v_neg)

    def decode(self, x: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in [0, 1] (``WanPipeline.__call__``'s decode, ``postprocess_video``)."""
        return decode_wan_vae(self.pipe.vae, x).transpose(1, 2).to(x.dtype)  # [B, F, 3, H, W]

    def offload_text_encoders(self) -> None:
        """Move UMT5 to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")

    def export_lora(self, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
        """diffusers' Wan LoRA file in ``out`` (``WanPipeline.save_lora_weights``); ``pipe.load_lora_weights(out)``
        loads it, with ``load_into_transformer_2=True`` for ``expert="low"``."""
        save_pipeline_lora(type(self.pipe), state, lora_config, out)

    def export_full(self, out: Path) -> None:
        """A pipeline folder in ``out`` with the trained expert in ``transformer/`` (``transformer_2/`` for
        ``expert="low"``; ``save_pipeline_folder``): ``WanTransformer3DModel.from_pretrained(out, subfolder=...)``."""
        save_pipeline_folder(self.pipe, self.module, out, "transformer_2" if self.trained else "transformer")


WAN_FOLDER = LocalFolder("wan", "Wan", "`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir "
                         "/models/Wan2.1-T2V-1.3B` (or Wan-AI/Wan2.2-T2V-A14B-Diffusers)")


@register_policy("wan", WAN_FOLDER)
def build_wan_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                     num_frames: int = 81, height: int = 480, width: int = 832, max_sequence_length: int = 512,
                     guidance_scale: float = 5.0, negative_prompt: str = "", expert: str = "high") -> WanPolicy:
    """Load a local diffusers Wan folder offline (``WanPipeline.from_pretrained(local_files_only=True)``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer(s), vae, text_encoder, tokenizer).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the transformer(s) and UMT5; the VAE stays float32.
        num_frames: Video frames, ``4k + 1`` (others are refused, not rounded as the pipeline does). 1 gives images.
        height: Pixels, a multiple of 16 (:func:`wan_size_rule`).
        width: Pixels, likewise.
        max_sequence_length: UMT5 tokens per prompt (the pipeline's 512).
        guidance_scale: Classifier-free guidance scale (the pipeline's 5.0); 1 or less turns CFG off.
        negative_prompt: The CFG negative prompt.
        expert: Wan 2.2 A14B: train the high-noise ``transformer`` (``high``) or ``transformer_2`` (``low``).

    Returns:
        The policy; UMT5, the VAE and an untrained second expert are frozen.
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    folder = local_folder(path, WAN_FOLDER, dtype)
    check_folder_size(folder, "wan", wan_size_rule, ("vae", "transformer"), height, width, num_frames)
    pipe = load_local_pipeline(WanPipeline, path, WAN_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder"), float32_vae=AutoencoderKLWan)
    policy = WanPolicy(pipe, num_frames, height, width, max_sequence_length, guidance_scale, negative_prompt, expert,
                       compute_dtype=DTYPES[dtype])
    for frozen in (m for m in policy.experts if m is not policy.module):  # the expert that is not trained
        frozen.requires_grad_(False).eval()
    return policy
