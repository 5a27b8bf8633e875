"""Z-Image adapter: text-to-image through diffusers ``ZImagePipeline`` components (Tongyi-MAI Z-Image and its
distilled Z-Image-Turbo).

The policy works on latents ``[B, C, H', W']`` (``H' = H / vae_scale_factor``, ``H`` a multiple of twice it, the
FLUX size rule); ``ZImageTransformer2DModel`` takes them as a list of ``[C, 1, H', W']`` images, patchifies them 2x2
itself and returns a list of the same shapes. Caption features are a list of per-prompt ``[L_i, D]`` tensors (no
padding); the adapter keeps them zero-padded to ``max_sequence_length`` and cuts each row back to its tokens.

Time convention, from ``ZImagePipeline.__call__``: the model's time runs the other way, ``timestep = (1000 - t) /
1000`` with the scheduler's ``t = sigma * 1000``, so the adapter feeds ``1 - sigma`` (0 = noise, 1 = data). The
transformer predicts ``x0 - noise``: the pipeline negates it (``noise_pred = -noise_pred``) before the scheduler's
Euler step, and so does the adapter, giving the velocity ``v = noise - x0``.

Text conditioning is the second-to-last hidden state of the Qwen3 text encoder over the tokenizer's chat template
(``ZImagePipeline.encode_prompt``: one user message, ``add_generation_prompt=True``, ``enable_thinking=True``),
only the prompt's tokens kept. CFG (``guidance_scale > 0``, the pipeline's rule; Turbo runs without it) is the
pipeline's ``pos + s * (pos - neg)`` against ``negative_prompt`` (encoded once), with its ``cfg_normalization``
(the guided prediction's norm capped at that multiple of the conditional one's, per sample) and ``cfg_truncation``
(no guidance once ``1 - sigma > cfg_truncation``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import flux_size_rule, per_sample_sigma, vae_decode
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, check_folder_size, check_size,
                                          load_local_pipeline, local_folder, pad_text_states, text_mask, vae_scale)

if TYPE_CHECKING:
    from diffusers import ZImagePipeline


def guidance_scales(sigma: Tensor, guidance_scale: float, truncation: float) -> Tensor:
    """Per-row CFG scale ``[B]``: ``guidance_scale``, or 0 where the model time ``1 - sigma`` exceeds ``truncation``
    (``ZImagePipeline``'s ``cfg_truncation``; 1 never truncates)."""
    return torch.where(1 - sigma > truncation, torch.zeros_like(sigma), torch.full_like(sigma, guidance_scale))


def guided_prediction(pos: Tensor, neg: Tensor, scale: Tensor, normalization: float) -> Tensor:
    """``ZImagePipeline``'s CFG: ``pos + s * (pos - neg)`` per row, its norm capped at ``normalization`` times
    ``pos``'s norm when ``normalization > 0``.

    Args:
        pos: Conditional predictions ``[B, ...]``.
        neg: Negative-prompt predictions ``[B, ...]``.
        scale: Guidance scale per row ``[B]``.
        normalization: The pipeline's ``cfg_normalization``; 0 turns the cap off.

    Returns:
        Guided predictions ``[B, ...]``.
    """
    view = (-1,) + (1,) * (pos.ndim - 1)
    pred = pos + scale.view(view) * (pos - neg)  # [B, ...]
    if normalization <= 0:
        return pred
    cap = normalization * pos.flatten(1).norm(dim=1)  # [B]
    norm = pred.flatten(1).norm(dim=1)  # [B]
    return pred * torch.where(norm > cap, cap / norm, torch.ones_like(norm)).view(view)


class ZImagePolicy(PipelineExports):
    """A diffusers ``ZImagePipeline`` as a ``FlowPolicy`` (Z-Image / Z-Image-Turbo, Tongyi-MAI 2025)."""

    def __init__(self, pipe: ZImagePipeline, height: int, width: int, max_sequence_length: int,
                 guidance_scale: float = 0.0, negative_prompt: str = "", cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0, compute_dtype: torch.dtype = torch.float32) -> None:
        self.pipe = pipe
        self.module = pipe.transformer
        check_size("z_image", flux_size_rule({"vae": pipe.vae.config}), height, width)
        scale = vae_scale(pipe.vae.config)
        self.latent_shape = (int(pipe.transformer.config.in_channels), int(height) // scale, int(width) // scale)
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        self.compute_dtype = compute_dtype
        self._negative: Tensor | None = None  # [1, L, D], encoded on first use

    def _encode(self, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.pipe.text_encoder.device,
                                                do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)  # B x [L_i, D]
        padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # [B, max L_i, D], zero rows after
        return pad_text_states(padded, None, self.max_sequence_length)  # [B, max_sequence_length, D]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Qwen3 hidden states through ``ZImagePipeline.encode_prompt`` (no grad), zero-padded."""
        if self.guidance_scale > 0 and self._negative is None:
            self._negative = self._encode([self.negative_prompt])  # [1, L, D]
        return Conditioning(self._encode(prompts))

    def _forward(self, x: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """``-transformer(...)``: the velocity ``[B, C, H', W']`` (float32) at model times ``t`` ``[B]``."""
        dtype = next(self.module.parameters()).dtype
        captions = [row[keep].to(dtype) for row, keep in zip(embeds, text_mask(embeds))]  # B x [L_i, D]
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights
            out = self.module(
                list(x.to(dtype).unsqueeze(2).unbind(0)),  # B x [C, 1, H', W']
                t.float(),  # [B], the model's time 1 - sigma in float32 as the pipeline's (its embedder casts)
                captions,
                return_dict=False,
            )[0]  # B x [C, 1, H', W'], the prediction x0 - noise
        return -torch.stack(out).squeeze(2).float()  # [B, C, H', W']

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` of the Z-Image transformer, with the pipeline's CFG when ``guidance_scale > 0``.

        Args:
            x: Latents ``[B, C, H', W']``.
            sigma: Noise levels ``[B]`` (or a scalar), 1 = noise; the model gets ``1 - sigma``.
            cond: Conditioning with ``B`` rows (zero-padded ``prompt_embeds [B, L, D]``).

        Returns:
            Velocity ``[B, C, H', W']`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        if self.guidance_scale <= 0:
            return self._forward(x, 1 - sigma, cond.prompt_embeds).to(x.dtype)
        negative = self._negative.to(cond.prompt_embeds).expand(b, -1, -1)  # [B, L, D]
        v, v_neg = self._forward(torch.cat([x, x]), torch.cat([1 - sigma, 1 - sigma]),
                                 torch.cat([cond.prompt_embeds, negative])).chunk(2)  # [B, C, H', W'] each
        scale = guidance_scales(sigma.float(), self.guidance_scale, self.cfg_truncation)  # [B]
        return guided_prediction(v, v_neg, scale, self.cfg_normalization).to(x.dtype)  # [B, C, H', W']

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1]: ``x / scaling_factor + shift_factor`` through the VAE, as
        ``ZImagePipeline.__call__`` (FLUX's decode, ``flux.vae_decode``)."""
        return vae_decode(self.pipe.vae, x)  # [B, 3, H, W]

    def offload_text_encoders(self) -> None:
        """Move Qwen3 to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")


Z_IMAGE_FOLDER = LocalFolder("z_image", "Z-Image",
                             "`hf download Tongyi-MAI/Z-Image-Turbo --local-dir /models/Z-Image-Turbo` (or "
                             "Tongyi-MAI/Z-Image, the undistilled base)")


@register_policy("z_image", Z_IMAGE_FOLDER)
def build_z_image_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                         height: int = 1024, width: int = 1024, max_sequence_length: int = 512,
                         guidance_scale: float = 0.0, negative_prompt: str = "", cfg_normalization: float = 0.0,
                         cfg_truncation: float = 1.0) -> ZImagePolicy:
    """Load a local diffusers Z-Image folder offline (``ZImagePipeline.from_pretrained(local_files_only=True)``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer, vae, text_encoder, tokenizer, scheduler).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        height: Image height in pixels, a multiple of 16 (:func:`flux.flux_size_rule`); sets ``latent_shape``.
        width: Image width in pixels, likewise.
        max_sequence_length: Text tokens per prompt, chat template included (the pipeline's 512).
        guidance_scale: The pipeline's ``guidance_scale``; 0 (Turbo, the default) turns CFG off, the pipeline's
            own default is 5.0.
        negative_prompt: The CFG negative prompt (the pipeline's default is empty).
        cfg_normalization: Cap on the guided prediction's norm, as a multiple of the conditional one's; 0 = off.
        cfg_truncation: CFG stops once ``1 - sigma`` exceeds it; 1 (the pipeline's default) never stops.

    Returns:
        The policy; the text encoder and the VAE are frozen.
    """
    from diffusers import ZImagePipeline

    folder = local_folder(path, Z_IMAGE_FOLDER, dtype)
    check_folder_size(folder, "z_image", flux_size_rule, ("vae",), height, width)  # before any weights load
    pipe = load_local_pipeline(ZImagePipeline, path, Z_IMAGE_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder"))
    return ZImagePolicy(pipe, height, width, max_sequence_length, guidance_scale, negative_prompt,
                        cfg_normalization, cfg_truncation, compute_dtype=DTYPES[dtype])
