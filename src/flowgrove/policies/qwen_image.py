"""Qwen-Image adapter: text-to-image through diffusers ``QwenImagePipeline`` components (Qwen/Qwen-Image).

The policy works on unpacked latents ``[B, C, H', W']`` (``H' = H / vae_scale_factor``, ``H`` a multiple of twice
it); the adapter packs them 2x2 into tokens as ``QwenImagePipeline._pack_latents`` (the FLUX packing, so
``flux.pack_latents`` is reused) and adds the VAE's frame axis only to decode. Timestep convention:
``QwenImagePipeline.__call__`` passes ``timestep = t / 1000`` with the scheduler's ``t = sigma * 1000``, so the
adapter feeds the exact float ``sigma``.
The transformer predicts ``noise - x0`` (the scheduler's Euler step ``x + (sigma_next - sigma) * v``).

Text conditioning is the last hidden state of the Qwen2.5-VL text encoder over the pipeline's prompt template
(its first 34 template tokens dropped), through ``QwenImagePipeline.encode_prompt``. Rows are zero-padded to
``max_sequence_length`` so that every encoding (and the on-disk prompt cache) has one length; the pipeline pads
with zero rows too, so the attention mask is recovered as the nonzero rows, and ``velocity`` trims the batch to
its longest prompt and passes no mask when nothing is padded, as the pipeline does. With ``guidance_scale > 1``
the velocity is the pipeline's true CFG against ``negative_prompt`` (encoded once), including its rescale of each
token's prediction to the norm of the conditional one.

``qwen_image_edit`` (``qwen_image_edit.py``) extends the policy: ``image_grid`` set, ``Conditioning.image_latents``
(the input images' packed tokens, ``image_grid`` each) follow the latent's tokens with an ``img_shapes`` entry per
image, and ``negative_prompt_embeds`` (the negative prompt encoded with each row's images) replace the shared
negative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import DTYPES, per_sample_sigma, pack_latents, unpack_latents
from flowgrove.policies.pipelines import (LocalFolder, PipelineExports, SizeRule, check_folder_size, check_size,
                                          decode_wan_vae, load_local_pipeline, local_folder, pad_text_states, text_mask)

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline


def qwen_size_rule(configs: Mapping[str, Mapping]) -> SizeRule:
    """Qwen-Image (``configs["vae"]``): sides are multiples of twice the VAE scale ``2 ** len(temperal_downsample)``,
    as the latent's 2x2 patches are packed into tokens (the pipeline rounds other sizes down)."""
    scale = 2 ** len(configs["vae"]["temperal_downsample"])
    return SizeRule(2 * scale, f"VAE scale {scale} x 2x2 latent patches")


class QwenImagePolicy(PipelineExports):
    """A diffusers ``QwenImagePipeline`` as a ``FlowPolicy`` (Qwen-Image, Wu et al. 2025)."""

    FAMILY = "qwen_image"  # the policy name its size errors give

    def __init__(self, pipe: QwenImagePipeline, height: int, width: int, max_sequence_length: int,
                 guidance_scale: float = 1.0, negative_prompt: str = " ", guidance: float | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        if bool(pipe.transformer.config.guidance_embeds) != (guidance is not None):
            raise ValueError("pass guidance (e.g. 1.0) exactly when the transformer embeds guidance "
                             f"(guidance_embeds={pipe.transformer.config.guidance_embeds}).")
        self.pipe = pipe
        self.module = pipe.transformer
        check_size(self.FAMILY, qwen_size_rule({"vae": pipe.vae.config}), height, width)
        vsf = pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels // 4, int(height) // vsf, int(width) // vsf)
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.guidance = guidance
        self.compute_dtype = compute_dtype
        self._negative: Tensor | None = None  # [1, L, D], encoded on first use
        self.image_grid: tuple[int, int] | None = None  # (rows, cols) of input-image tokens (qwen_image_edit)

    def _encode(self, prompts: Sequence[str], images: Sequence[Any] | None = None) -> Tensor:
        """Text states ``[B, max_sequence_length, D]`` (with ``images``: the edit pipeline's, which sees them)."""
        extra = {} if images is None else {"image": list(images)}
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.pipe.text_encoder.device,
                                                   max_sequence_length=self.max_sequence_length,
                                                   **extra)  # [B, L, D], [B, L]
        if embeds.shape[1] > self.max_sequence_length:  # the edit pipeline does not cut its image tokens
            raise ValueError(f"policy.options.max_sequence_length={self.max_sequence_length} is shorter than the "
                             f"{embeds.shape[1]} text and image tokens of these prompts; set it to at least that")
        return pad_text_states(embeds, mask, self.max_sequence_length)  # [B, max_sequence_length, D]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Qwen2.5-VL last hidden states through ``QwenImagePipeline.encode_prompt`` (no grad), zero-padded."""
        if self.guidance_scale > 1 and self._negative is None:
            self._negative = self._encode([self.negative_prompt])  # [1, L, D]
        return Conditioning(self._encode(prompts))

    def _forward(self, x: Tensor, sigma: Tensor, embeds: Tensor, image: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        tokens = pack_latents(x)  # [B, HW/4, 4C]
        n, shapes = tokens.shape[1], [(1, h // 2, w // 2)]
        if image is not None:  # the edit pipelines: the input images' tokens [B, k * N, 4C] follow, a shape each
            tokens = torch.cat([tokens, image.to(tokens.dtype)], dim=1)
            shapes += [(1, *self.image_grid)] * (image.shape[1] // (self.image_grid[0] * self.image_grid[1]))
        mask = text_mask(embeds)  # [B, L]
        length = max(int(mask.sum(dim=1).max()), 1)
        embeds, mask = embeds[:, :length], mask[:, :length]  # the pipeline pads to the batch's longest prompt
        dtype = next(self.module.parameters()).dtype
        guidance = None if self.guidance is None else torch.full((b,), float(self.guidance), device=x.device)
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights
            out = self.module(
                hidden_states=tokens.to(dtype),  # [B, HW/4 (+ N), 4C]
                encoder_hidden_states=embeds.to(dtype),  # [B, L, D]
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # [B, L]
                timestep=sigma.to(dtype),  # [B]; the pipeline's t / 1000 (module docstring)
                img_shapes=[shapes] * b,
                guidance=guidance,
                return_dict=False,
            )[0][:, :n]  # [B, HW/4, 4C]: the latent's tokens (the edit pipelines' ``noise_pred[:, : latents.size(1)]``)
        return out.float()

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` of the Qwen-Image transformer, with true CFG when ``guidance_scale > 1``.

        Args:
            x: Latents ``[B, C, H', W']``.
            sigma: Noise levels ``[B]`` (or a scalar), 1 = noise; fed exactly as ``timestep``.
            cond: Conditioning with ``B`` rows (zero-padded ``prompt_embeds [B, L, D]``; for edits also
                ``image_latents [B, N, 4C]`` and, under CFG, ``negative_prompt_embeds [B, L, D]``).

        Returns:
            Velocity ``[B, C, H', W']`` in ``x.dtype``.
        """
        b, _, h, w = x.shape
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        image = cond.image_latents  # [B, N, 4C] or None
        if self.guidance_scale <= 1:
            return unpack_latents(self._forward(x, sigma, cond.prompt_embeds, image), h, w).to(x.dtype)
        negative = cond.negative_prompt_embeds  # [B, L, D]: per row (edits) or the shared negative prompt
        if negative is None:
            negative = self._negative.to(cond.prompt_embeds).expand(b, -1, -1)
        both = None if image is None else torch.cat([image, image])  # [2B, N, 4C]
        v, v_neg = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                 torch.cat([cond.prompt_embeds, negative]), both).chunk(2)  # [B, HW/4, 4C] each
        guided = v_neg + self.guidance_scale * (v - v_neg)
        guided = guided * (v.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))  # the pipeline's rescale
        return unpack_latents(guided, h, w).to(x.dtype)  # [B, C, H', W']

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (``QwenImagePipeline.__call__``'s decode and postprocess)."""
        return decode_wan_vae(self.pipe.vae, x[:, :, None])[:, :, 0].to(x.dtype)  # [B, 3, H, W]; one VAE frame

    def offload_text_encoders(self) -> None:
        """Move Qwen2.5-VL to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")


QWEN_IMAGE_FOLDER = LocalFolder("qwen_image", "Qwen-Image",
                                "`hf download Qwen/Qwen-Image --local-dir /models/Qwen-Image`")


@register_policy("qwen_image", QWEN_IMAGE_FOLDER)
def build_qwen_image_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                            height: int = 1024, width: int = 1024, max_sequence_length: int = 512,
                            guidance_scale: float = 1.0, negative_prompt: str = " ",
                            guidance: float | None = None) -> QwenImagePolicy:
    """Load a local diffusers Qwen-Image folder offline (``QwenImagePipeline.from_pretrained(local_files_only=True)``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer, vae, text_encoder, tokenizer).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the transformer and text encoder; the VAE stays float32.
        height: Image height in pixels, a multiple of 16 (:func:`qwen_size_rule`); sets ``latent_shape``.
        width: Image width in pixels, likewise.
        max_sequence_length: Text tokens per prompt after the template (the pipeline's 512).
        guidance_scale: The pipeline's ``true_cfg_scale`` (its examples use 4.0); 1 or less turns CFG off.
        negative_prompt: The CFG negative prompt (the pipeline's examples use " ").
        guidance: Distilled guidance for a transformer with ``guidance_embeds``; None for Qwen-Image.

    Returns:
        The policy; the text encoder and the VAE are frozen.
    """
    from diffusers import QwenImagePipeline

    pipe = load_qwen_pipeline(QwenImagePipeline, QWEN_IMAGE_FOLDER, path, device, dtype, height, width)
    return QwenImagePolicy(pipe, height, width, max_sequence_length, guidance_scale, negative_prompt, guidance,
                           compute_dtype=DTYPES[dtype])


def load_qwen_pipeline(pipeline_cls: type, spec: LocalFolder, path: str, device: str | torch.device, dtype: str,
                       height: int, width: int, components: Mapping[str, Any] | None = None) -> Any:
    """The folder and size checks (before any weights load), then ``pipeline_cls`` loaded offline with its text
    encoder and VAE frozen, the VAE in float32 (``qwen_image`` and ``qwen_image_edit``)."""
    from diffusers import AutoencoderKLQwenImage

    folder = local_folder(path, spec, dtype)
    check_folder_size(folder, spec.family, qwen_size_rule, ("vae",), height, width)
    return load_local_pipeline(pipeline_cls, path, spec, dtype=dtype, device=device, frozen=("vae", "text_encoder"),
                               float32_vae=AutoencoderKLQwenImage, components=components)
