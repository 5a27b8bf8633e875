"""FLUX adapter: latent packing, position ids and the model-facing timestep (diffusers ``FluxPipeline``).

Used by the built-in ``digits`` policy, by the ``flux1`` policy (a local diffusers FLUX.1 folder) and by
``flux_kontext`` (FLUX.1 Kontext, whose input image's tokens follow the latent's: ``Conditioning.image_latents``).
Timestep convention: diffusers' ``FluxPipeline`` passes ``timestep = t / 1000`` with ``t = sigma * 1000``
and ``FluxTransformer2DModel`` multiplies it by 1000 again, so the model sees ``1000 * sigma``. The adapter
feeds the exact float ``sigma`` as ``timestep``: the same value, without the round trip and never quantised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, SizeRule, check_folder_size, check_size,
                                          load_local_pipeline, local_folder, vae_scale)

if TYPE_CHECKING:
    from diffusers import FluxPipeline


def pack_latents(x: Tensor) -> Tensor:
    """2x2 patches to tokens, as ``FluxPipeline._pack_latents`` (diffusers).

    Args:
        x: Latents ``[B, C, H, W]`` with even ``H`` and ``W``.

    Returns:
        Tokens ``[B, (H/2)*(W/2), 4C]``, row-major over patches, channel-major inside a token.
    """
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height and width must be even, got {h}x{w}.")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)  # [B, (H/2)*(W/2), 4C]


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_latents``, as ``FluxPipeline._unpack_latents`` (diffusers) with latent sizes.

    Args:
        tokens: ``[B, (H/2)*(W/2), 4C]``.
        height: Latent height ``H`` (not pixels).
        width: Latent width ``W``.

    Returns:
        Latents ``[B, C, H, W]``.
    """
    b, n, channels = tokens.shape
    if n != (height // 2) * (width // 2) or channels % 4:
        raise ValueError(f"cannot unpack {n} tokens of {channels} channels into a {height}x{width} latent.")
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, H/2, 2, W/2, 2]
    return x.reshape(b, channels // 4, height, width)  # [B, C, H, W]


def latent_image_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, row, col)`` of the packed tokens, as ``FluxPipeline._prepare_latent_image_ids``.

    Args:
        height: Latent height ``H`` (the pipeline is called with ``H // 2``).
        width: Latent width ``W``.
        device: Device of the result.

    Returns:
        Ids ``[(H/2)*(W/2), 3]`` float32.
    """
    ids = torch.zeros(height // 2, width // 2, 3)  # [H/2, W/2, 3]
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device)  # [(H/2)*(W/2), 3]


def kontext_image_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(1, row, col)`` ``[(H/2)*(W/2), 3]`` of an input image's packed tokens (FLUX.1 Kontext's
    ``prepare_latents``: the latent's ids with the first coordinate set to 1)."""
    ids = latent_image_ids(height, width, device)  # [(H/2)*(W/2), 3]
    ids[:, 0] = 1
    return ids


def per_sample_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    sigma = torch.as_tensor(sigma, device=device)
    if sigma.ndim == 0:
        return sigma.expand(batch)  # [B]
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape [B]=[{batch}], got {tuple(sigma.shape)}.")
    return sigma  # [B]


class FluxAdapter:
    """Calls a ``FluxTransformer2DModel`` on unpacked latents and exact sigmas (diffusers ``FluxPipeline``).

    ``transformer`` may be replaced by a wrapper (DDP, ``torch.compile``) that forwards the same keywords.
    """

    def __init__(self, transformer: nn.Module, guidance: float | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        embeds_guidance = bool(transformer.config.guidance_embeds)
        if embeds_guidance and guidance is None:
            raise ValueError("this FLUX transformer embeds guidance (FLUX.1-dev): pass guidance, e.g. 3.5.")
        if not embeds_guidance and guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedding (FLUX.1-schnell): pass guidance=None.")
        self.transformer = transformer
        self.guidance = guidance
        self.compute_dtype = compute_dtype  # bf16/fp16: the forward runs under autocast over float32 master weights
        self._ids: dict[tuple, Tensor] = {}

    def _cached_ids(self, key: tuple, make) -> Tensor:
        if key not in self._ids:
            self._ids[key] = make()
        return self._ids[key]

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` (FLUX's prediction) at latents ``x`` and noise levels ``sigma``.

        Args:
            x: Latents ``[B, C, H, W]``.
            sigma: Noise levels ``[B]`` (or a scalar for all rows), 1 = noise; fed exactly as ``timestep``.
            cond: Conditioning with ``B`` rows.

        Returns:
            Velocity ``[B, C, H, W]`` in ``x.dtype``.
        """
        b, _, h, w = x.shape
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        dtype = next(self.transformer.parameters()).dtype
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        tokens = pack_latents(x)  # [B, HW/4, 4C]
        n = tokens.shape[1]
        img_ids = self._cached_ids(("img", h, w, x.device), lambda: latent_image_ids(h, w, x.device))
        if cond.image_latents is not None:  # Kontext: the input image's tokens [B, HW/4, 4C] follow, ids (1, row, col)
            tokens = torch.cat([tokens, cond.image_latents.to(tokens.dtype)], dim=1)  # [B, HW/2, 4C]
            img_ids = self._cached_ids(("kontext", h, w, x.device),
                                       lambda: torch.cat([img_ids, kontext_image_ids(h, w, x.device)]))
        n_txt = cond.prompt_embeds.shape[1]
        txt_ids = self._cached_ids(("txt", n_txt, x.device), lambda: torch.zeros(n_txt, 3, device=x.device))
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=x.device, dtype=torch.float32)  # [B]
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights; log-probs stay float32 outside
            out = self.transformer(
                hidden_states=tokens.to(dtype),  # [B, HW/4 (+ HW/4 input image tokens), 4C]
                encoder_hidden_states=cond.prompt_embeds.to(dtype),  # [B, L, D]
                pooled_projections=None if cond.pooled is None else cond.pooled.to(dtype),  # [B, P]
                timestep=sigma,  # [B]; the model casts it to its dtype and multiplies by 1000 (module docstring)
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0][:, :n]  # [B, HW/4, 4C]: the latent's tokens (the pipelines' ``noise_pred[:, : latents.size(1)]``)
        return unpack_latents(out, h, w).to(x.dtype)  # [B, C, H, W]


def vae_decode(vae: nn.Module, x: Tensor) -> Tensor:
    """Images in [0, 1] from FLUX latents (``FluxPipeline.__call__`` decode + ``VaeImageProcessor.postprocess``).

    Args:
        vae: A diffusers ``AutoencoderKL`` whose config has ``scaling_factor`` (and ``shift_factor``).
        x: Latents ``[B, C, H, W]``.

    Returns:
        Images ``[B, 3, H * f, W * f]`` in [0, 1], in ``x.dtype``.
    """
    shift = vae.config.shift_factor or 0.0
    latents = x / vae.config.scaling_factor + shift  # [B, C, H, W]
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # [B, 3, H*f, W*f] in [-1, 1]
    return (image / 2 + 0.5).clamp(0, 1).to(x.dtype)  # [B, 3, H*f, W*f]


def flux_size_rule(configs: Mapping[str, Mapping]) -> SizeRule:
    """FLUX.1 and FLUX.2 (``configs["vae"]``): sides are multiples of twice the VAE scale, as the latent's 2x2
    patches are packed into tokens (``FluxPipeline._unpack_latents``; FLUX.2 folds them into channels) and the
    pipelines round other sizes down."""
    scale = vae_scale(configs["vae"])
    return SizeRule(2 * scale, f"VAE scale {scale} x 2x2 latent patches")


class Flux1Policy(PipelineExports):
    """A diffusers FLUX.1 pipeline as a ``FlowPolicy`` (black-forest-labs FLUX.1 dev / schnell)."""

    FAMILY = "flux1"  # the policy name its size errors give

    def __init__(self, pipe: FluxPipeline, guidance: float | None, height: int, width: int,
                 max_sequence_length: int, compute_dtype: torch.dtype = torch.float32) -> None:
        self.pipe = pipe
        self.adapter = FluxAdapter(pipe.transformer, guidance, compute_dtype)
        self.max_sequence_length = max_sequence_length
        check_size(self.FAMILY, flux_size_rule({"vae": pipe.vae.config}), height, width)
        scale = vae_scale(pipe.vae.config)
        self.latent_shape = (pipe.transformer.config.in_channels // 4, int(height) // scale, int(width) // scale)

    @property
    def module(self) -> nn.Module:
        """The transformer the adapter calls (and the trainer trains; FSDP2 shards it in place)."""
        return self.adapter.transformer

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.adapter.transformer = value

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """CLIP pooled + T5 token embeddings through ``FluxPipeline.encode_prompt`` (no grad)."""
        device = self.pipe.text_encoder.device
        with torch.no_grad():
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
            )  # [B, L, 4096], [B, 768]
        return Conditioning(prompt_embeds, pooled)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Velocity ``[B, C, H, W]`` through ``FluxAdapter.velocity``."""
        return self.adapter.velocity(x, sigma, cond)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H', W']`` in [0, 1] through the pipeline's VAE (``vae_decode``)."""
        return vae_decode(self.pipe.vae, x)  # [B, 3, H', W']

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2):
            encoder.to("cpu")


FLUX1_FOLDER = LocalFolder("flux1", "FLUX.1", "`hf download black-forest-labs/FLUX.1-dev --local-dir "
                           "/models/FLUX.1-dev` (or FLUX.1-schnell; accept the licence on huggingface.co and log in "
                           "first)")


@register_policy("flux1", FLUX1_FOLDER)
def build_flux1_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                       guidance: float | None = 3.5, height: int = 512, width: int = 512,
                       max_sequence_length: int = 512) -> Flux1Policy:
    """Load a local diffusers FLUX.1 folder offline (``FluxPipeline.from_pretrained(local_files_only=True)``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer, vae, text encoders, tokenizers).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        guidance: Distilled guidance scale (FLUX.1-dev 3.5); ignored when the transformer has no guidance
            embedding (FLUX.1-schnell).
        height: Image height in pixels, a multiple of 16 (:func:`flux_size_rule`); sets ``latent_shape``.
        width: Image width in pixels, likewise.
        max_sequence_length: T5 tokens per prompt (512 dev, 256 schnell).

    Returns:
        The policy; its text encoders and VAE are frozen.
    """
    from diffusers import FluxPipeline

    return load_flux1_family(FluxPipeline, Flux1Policy, FLUX1_FOLDER, path, device, dtype, guidance, height, width,
                             max_sequence_length)


def load_flux1_family(pipeline_cls: type, policy_cls: type[Flux1Policy], spec: LocalFolder, path: str,
                      device: str | torch.device, dtype: str, guidance: float | None, height: int, width: int,
                      max_sequence_length: int) -> Flux1Policy:
    """The folder and size checks (before any weights load), the pipeline loaded offline with its text encoders and
    VAE frozen, and ``policy_cls`` over it; ``guidance`` is dropped when the transformer has no guidance embedding.
    Shared by ``flux1`` and ``flux_kontext`` (the same components)."""
    folder = local_folder(path, spec, dtype)
    check_folder_size(folder, spec.family, flux_size_rule, ("vae",), height, width)
    pipe = load_local_pipeline(pipeline_cls, path, spec, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder", "text_encoder_2"))
    if not pipe.transformer.config.guidance_embeds:
        guidance = None
    return policy_cls(pipe, guidance, height, width, max_sequence_length, compute_dtype=DTYPES[dtype])
