"""HunyuanVideo adapter: text-to-video through diffusers ``HunyuanVideoPipeline`` components (Tencent HunyuanVideo).

A rectified flow on 5-D latents ``[B, C, F', H', W']`` with ``F' = (F - 1) / 4 + 1`` latent frames
(``vae_scale_factor_temporal``; ``F = 4k + 1``, others are refused) and ``H' = H / 8`` (``vae_scale_factor_spatial``),
as ``prepare_latents``; ``decode`` returns videos ``[B, F, 3, H, W]`` in [0, 1].
Timestep convention: ``HunyuanVideoPipeline.__call__`` passes the scheduler's ``t = sigma * 1000`` unchanged to
``HunyuanVideoTransformer3DModel``, so the adapter feeds the exact float ``1000 * sigma`` (DanceGRPO feeds
``floor(1000 sigma)``; flowgrove never quantises). The transformer predicts ``noise - x0`` (the scheduler's Euler
step is ``x + (sigma_next - sigma) * v``), the policy's velocity.

Guidance is the transformer's guidance *embedding* (HunyuanVideo is guidance-distilled): the pipeline feeds
``guidance = guidance_scale * 1000`` (its default 6.0; DanceGRPO 6.018) on every call, with no classifier-free
branch. Text conditioning is the pipeline's ``encode_prompt``: the Llama text encoder's third-to-last hidden states
over the prompt template (the template's ``crop_start`` tokens dropped) with their attention mask, and the CLIP
text encoder's pooled output (``pooled_projections``). The Llama states are stored with their padding rows set to
zero (``pad_text_states``), so the mask is recovered as the nonzero rows (``text_mask``); the transformer ignores
masked tokens, so this is the pipeline's call exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import per_sample_sigma
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, SizeRule, check_folder_size, check_size,
                                          load_local_pipeline, local_folder, pad_text_states, text_mask)

if TYPE_CHECKING:
    from diffusers import HunyuanVideoPipeline


def hunyuan_size_rule(configs: Mapping[str, Mapping]) -> SizeRule:
    """HunyuanVideo (``configs["vae"]``): sides are multiples of 16 (the pipeline's ``check_inputs``), frames
    ``1 + temporal_compression_ratio * k`` (others would decode to another number of frames)."""
    return SizeRule(16, "the pipeline's check_inputs", int(configs["vae"]["temporal_compression_ratio"]))


def hunyuan_latent_shape(pipe: HunyuanVideoPipeline, num_frames: int, height: int,
                         width: int) -> tuple[int, int, int, int]:
    """``(C, F', H', W')`` of one latent, as ``HunyuanVideoPipeline.prepare_latents``.

    Raises:
        ConfigError: a size the pipeline refuses or would decode to another size (:func:`hunyuan_size_rule`).
    """
    check_size("hunyuan_video", hunyuan_size_rule({"vae": pipe.vae.config}), height, width, num_frames)
    temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return (int(pipe.transformer.config.in_channels), (int(num_frames) - 1) // temporal + 1, int(height) // spatial,
            int(width) // spatial)


class HunyuanVideoPolicy(PipelineExports):
    """A diffusers ``HunyuanVideoPipeline`` as a ``FlowPolicy`` on 5-D video latents, with embedded guidance."""

    def __init__(self, pipe: HunyuanVideoPipeline, num_frames: int, height: int, width: int,
                 max_sequence_length: int = 256, guidance: float | None = 6.0, prompt_template: dict | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        if bool(pipe.transformer.config.guidance_embeds) != (guidance is not None):
            raise ValueError("pass guidance (HunyuanVideo: 6.0) exactly when the transformer embeds guidance "
                             f"(guidance_embeds={pipe.transformer.config.guidance_embeds}).")
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        self.pipe = pipe
        self.module = pipe.transformer
        self.latent_shape = hunyuan_latent_shape(pipe, num_frames, height, width)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance = guidance
        self.prompt_template = dict(prompt_template or DEFAULT_PROMPT_TEMPLATE)
        self.compute_dtype = compute_dtype

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Llama states (zero-padded, ``[B, max_sequence_length, D]``) and pooled CLIP ``[B, P]`` through
        ``HunyuanVideoPipeline.encode_prompt`` (no grad)."""
        with torch.no_grad():
            embeds, pooled, mask = self.pipe.encode_prompt(
                prompt=list(prompts), prompt_template=self.prompt_template, device=self.pipe.text_encoder.device,
                max_sequence_length=self.max_sequence_length,
            )  # [B, L, D], [B, P], [B, L]
        return Conditioning(pad_text_states(embeds, mask, self.max_sequence_length), pooled)

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` of the HunyuanVideo transformer, guidance embedded.

        Args:
            x: Latents ``[B, C, F', H', W']``.
            sigma: Noise levels ``[B]`` (or a scalar), 1 = noise; fed as ``timestep = 1000 * sigma``.
            cond: Conditioning with ``B`` rows (``prompt_embeds [B, L, D]`` zero-padded, ``pooled [B, P]``).

        Returns:
            Velocity ``[B, C, F', H', W']`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b or cond.pooled is None:
            raise ValueError(f"cond must have {b} rows with pooled embeddings (HunyuanVideoPolicy.encode_prompts), "
                             f"got {len(cond)}.")
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        dtype = next(self.module.parameters()).dtype
        guidance = None
        if self.guidance is not None:  # the pipeline's tensor([scale] * B, dtype) * 1000
            guidance = torch.full((b,), float(self.guidance), dtype=dtype, device=x.device) * 1000.0  # [B]
        mask = text_mask(cond.prompt_embeds)  # [B, L]
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights
            out = self.module(hidden_states=x.to(dtype), timestep=(1000 * sigma).to(x.dtype),  # [B]; module docstring
                              encoder_hidden_states=cond.prompt_embeds.to(dtype),  # [B, L, D]
                              encoder_attention_mask=mask.to(dtype), pooled_projections=cond.pooled.to(dtype),
                              guidance=guidance, return_dict=False)[0]  # [B, C, F', H', W']
        return out.to(x.dtype)

    def decode(self, x: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in [0, 1]: ``vae.decode(x / scaling_factor)`` and ``postprocess_video``, as
        ``HunyuanVideoPipeline.__call__``."""
        vae = self.pipe.vae
        pixels = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]  # [B, 3, F, H, W]
        return (pixels / 2 + 0.5).clamp(0, 1).transpose(1, 2).to(x.dtype)  # [B, F, 3, H, W]

    def offload_text_encoders(self) -> None:
        """Move Llama and CLIP to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")
        self.pipe.text_encoder_2.to("cpu")


HUNYUAN_VIDEO_FOLDER = LocalFolder("hunyuan_video", "HunyuanVideo",
                                   "`hf download hunyuanvideo-community/HunyuanVideo --local-dir /models/HunyuanVideo`")


@register_policy("hunyuan_video", HUNYUAN_VIDEO_FOLDER)
def build_hunyuan_video_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                               num_frames: int = 53, height: int = 480, width: int = 480,
                               max_sequence_length: int = 256, guidance: float | None = 6.0,
                               prompt_template: dict | None = None, vae_tiling: bool = True) -> HunyuanVideoPolicy:
    """Load a local diffusers HunyuanVideo folder offline (``HunyuanVideoPipeline.from_pretrained``, local files only).

    Args:
        path: The diffusers folder (``model_index.json``, transformer, vae, text_encoder(_2), tokenizer(_2)).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the transformer and text encoders; the VAE stays float32.
        num_frames: Video frames ``F``, ``4k + 1`` (they decode back to ``F``; DanceGRPO trains 53).
        height: Pixels, a multiple of 16 (DanceGRPO 480).
        width: Pixels, a multiple of 16 (DanceGRPO 480).
        max_sequence_length: Llama tokens per prompt after the template (the pipeline's 256).
        guidance: The embedded guidance scale (the pipeline's ``guidance_scale``, fed times 1000; 6.0); None for a
            transformer without ``guidance_embeds``.
        prompt_template: The Llama prompt template ``{"template": ..., "crop_start": ...}``; None: the pipeline's.
        vae_tiling: Decode in tiles (``vae.enable_tiling()``, as diffusers' examples), for long videos.

    Returns:
        The policy; both text encoders and the VAE are frozen.
    """
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline

    folder = local_folder(path, HUNYUAN_VIDEO_FOLDER, dtype)
    check_folder_size(folder, "hunyuan_video", hunyuan_size_rule, ("vae",), height, width, num_frames)
    pipe = load_local_pipeline(HunyuanVideoPipeline, path, HUNYUAN_VIDEO_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder", "text_encoder_2"), float32_vae=AutoencoderKLHunyuanVideo)
    if vae_tiling:
        pipe.vae.enable_tiling()
    return HunyuanVideoPolicy(pipe, num_frames, height, width, max_sequence_length, guidance, prompt_template,
                              compute_dtype=DTYPES[dtype])
