"""FLUX.2 adapter: FLUX.2 [dev] (``Flux2Pipeline``) and FLUX.2 [klein] (``Flux2KleinPipeline``), one ``flux2`` policy.

The folder's ``model_index.json`` names the pipeline; both share the transformer, the VAE and everything below.

Latents: the policy's latent ``[B, C, H, W]`` is the pipelines' own denoising space, the VAE latent's 2x2 patches
folded into channels and batch-normalised (``_patchify_latents``, ``bn`` in ``_encode_vae_image``): ``C`` is the
transformer's ``in_channels`` (128) and ``H = height / (2 * vae_scale)``. Packing is a flatten into ``H * W``
tokens of ``C`` channels (``_pack_latents``) with 4D position ids ``(0, row, col, 0)`` (``_prepare_latent_ids``);
text tokens get ``(0, 0, 0, l)`` (``_prepare_text_ids``). Decoding undoes the batch norm and the patches
(``__call__``'s ``latents * bn_std + bn_mean``, ``_unpatchify_latents``) before ``vae.decode``.

Timestep convention: the pipelines pass ``timestep = t / 1000`` with ``t = sigma * 1000`` and the transformer
multiplies by 1000 again, so the adapter feeds the exact float ``sigma``. The transformer predicts ``noise - x0``.

Text: [dev] stacks the Mistral-3 text encoder's hidden states 10/20/30 over its system prompt, [klein] the Qwen3
encoder's 9/18/27 over its chat template (``encode_prompt``, the pipeline's default layers), every prompt padded to
``max_sequence_length`` tokens and passed without a mask, as the pipelines do. [dev]'s ``tokenizer`` component is
a ``PixtralProcessor``, which transformers refuses without torchvision: the adapter loads the folder's
``tokenizer/`` (tokenizer files and chat template) as a plain tokenizer instead, whose ``apply_chat_template``
gives the processor's ids for text-only messages once the template starts with the BOS token (Mistral's does;
:func:`text_tokenizer` checks it).

Guidance follows the pipeline's ``guidance_scale``: [dev] embeds it (``guidance`` input); [klein] applies true CFG
``v_neg + s (v - v_neg)`` against the empty prompt when ``s > 1``, except a step-distilled folder
(``is_distilled``), which ignores it.

Schedule: the pipelines' grid is ``linspace(1, 1/N, N)`` shifted with ``mu = compute_empirical_mu(tokens, N)``
(exponential time shift), which is flowgrove's ``sampler.schedule=flux`` with ``sampler.shift = exp(mu)``
(:func:`flux2_shift`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import flux_size_rule, per_sample_sigma
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, check_folder_size, check_size,
                                          load_local_pipeline, local_folder, vae_scale)

if TYPE_CHECKING:
    from diffusers import Flux2Pipeline


def pack_tokens(x: Tensor) -> Tensor:
    """Latents ``[B, C, H, W]`` as tokens ``[B, H*W, C]``, row-major (``Flux2Pipeline._pack_latents``)."""
    return x.flatten(2).transpose(1, 2)  # [B, H*W, C]


def unpack_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_tokens`: ``[B, H*W, C]`` to ``[B, C, H, W]`` (``_unpack_latents_with_ids`` on the
    row-major ids of :func:`latent_ids`)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)  # [B, C, H, W]


def latent_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(t=0, row, col, l=0)`` ``[H*W, 4]`` of the image tokens (``_prepare_latent_ids``)."""
    zero = torch.arange(1)
    return torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero).to(device)  # [H*W, 4]


def text_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, 0, 0, l)`` ``[L, 4]`` of the text tokens (``_prepare_text_ids``)."""
    zero = torch.arange(1)
    return torch.cartesian_prod(zero, zero, zero, torch.arange(length)).to(device)  # [L, 4]


def flux2_shift(scheduler_config: Mapping, image_tokens: int, num_steps: int) -> float:
    """``sampler.shift`` that puts flowgrove's ``flux`` grid on the FLUX.2 pipelines' sigmas: ``exp(mu)`` with the
    pipelines' ``compute_empirical_mu(image_tokens, num_steps)`` when the scheduler shifts dynamically, else its
    static ``shift``.

    Args:
        scheduler_config: The folder's ``FlowMatchEulerDiscreteScheduler`` config.
        image_tokens: ``H * W`` of the latent (4096 at 1024x1024).
        num_steps: Denoising steps ``N`` (``sampler.num_steps``).
    """
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    if not scheduler_config.get("use_dynamic_shifting", False):
        return float(scheduler_config.get("shift", 1.0))
    return math.exp(compute_empirical_mu(image_seq_len=image_tokens, num_steps=num_steps))


def decode_flux2_vae(vae: nn.Module, x: Tensor) -> Tensor:
    """Images ``[B, 3, 2hf, 2wf]`` in [0, 1] from latents ``[B, 4c, h, w]`` (``Flux2Pipeline.__call__``'s decode):
    the VAE's batch norm undone, the 2x2 patches unfolded, ``vae.decode``, ``x / 2 + 0.5`` clamped."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, torch.float32)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, torch.float32)
    latents = x.float() * std + mean  # [B, 4c, h, w]
    b, c4, h, w = latents.shape
    latents = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # [B, 3, 2hf, 2wf] in [-1, 1]
    return (image / 2 + 0.5).clamp(0, 1).to(x.dtype)


class Flux2Policy(PipelineExports):
    """A diffusers FLUX.2 pipeline ([dev] or [klein]) as a ``FlowPolicy`` (module docstring)."""

    def __init__(self, pipe: Flux2Pipeline, height: int, width: int, max_sequence_length: int = 512,
                 guidance_scale: float = 4.0, compute_dtype: torch.dtype = torch.float32) -> None:
        self.pipe = pipe
        self.module = pipe.transformer
        check_size("flux2", flux_size_rule({"vae": pipe.vae.config}), height, width)
        side = 2 * vae_scale(pipe.vae.config)
        self.latent_shape = (int(pipe.transformer.config.in_channels), int(height) // side, int(width) // side)
        self.max_sequence_length = max_sequence_length
        self.compute_dtype = compute_dtype
        embeds = bool(pipe.transformer.config.guidance_embeds)
        self.guidance = float(guidance_scale) if embeds else None  # [dev]: the embedded guidance
        distilled = bool(getattr(pipe.config, "is_distilled", False))
        self.cfg_scale = float(guidance_scale) if not embeds and not distilled and guidance_scale > 1 else None
        self._negative: Tensor | None = None  # [1, L, D], the empty prompt, encoded on first use under CFG

    def _encode(self, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.pipe.text_encoder.device,
                                                max_sequence_length=self.max_sequence_length)  # [B, L, 3 * D_text]
        return embeds

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Stacked text-encoder layers through the pipeline's ``encode_prompt`` (no grad), ``max_sequence_length``
        tokens per prompt."""
        if self.cfg_scale is not None and self._negative is None:
            self._negative = self._encode([""])  # [1, L, D]; the pipelines' negative prompt
        return Conditioning(self._encode(prompts))

    def _forward(self, x: Tensor, sigma: Tensor, embeds: Tensor) -> Tensor:
        b, _, h, w = x.shape
        dtype = next(self.module.parameters()).dtype
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=x.device)  # [B]
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights
            out = self.module(
                hidden_states=pack_tokens(x).to(dtype),  # [B, HW, C]
                encoder_hidden_states=embeds.to(dtype),  # [B, L, D]
                timestep=sigma.to(dtype),  # [B]; the pipeline's t / 1000 (module docstring)
                img_ids=latent_ids(h, w, x.device),  # [HW, 4]
                txt_ids=text_ids(embeds.shape[1], x.device),  # [L, 4]
                guidance=guidance,
                return_dict=False,
            )[0]  # [B, HW, C]
        return out.float()

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` of the FLUX.2 transformer, with [klein]'s true CFG when it is on.

        Args:
            x: Latents ``[B, C, H, W]``.
            sigma: Noise levels ``[B]`` (or a scalar), 1 = noise; fed exactly as ``timestep``.
            cond: Conditioning with ``B`` rows (``prompt_embeds [B, L, D]``).

        Returns:
            Velocity ``[B, C, H, W]`` in ``x.dtype``.
        """
        b, _, h, w = x.shape
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        if self.cfg_scale is None:
            return unpack_tokens(self._forward(x, sigma, cond.prompt_embeds), h, w).to(x.dtype)
        negative = self._negative.to(cond.prompt_embeds).expand(b, -1, -1)  # [B, L, D]
        v, v_neg = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                 torch.cat([cond.prompt_embeds, negative])).chunk(2)  # [B, HW, C] each
        return unpack_tokens(v_neg + self.cfg_scale * (v - v_neg), h, w).to(x.dtype)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H', W']`` in [0, 1] through the pipeline's VAE (:func:`decode_flux2_vae`)."""
        return decode_flux2_vae(self.pipe.vae, x)

    def offload_text_encoders(self) -> None:
        """Move the text encoder to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")


FLUX2_FOLDER = LocalFolder("flux2", "FLUX.2", "`hf download black-forest-labs/FLUX.2-klein-base-4B --local-dir "
                           "/models/FLUX.2-klein-base-4B` (or FLUX.2-dev, FLUX.2-klein-4B / 9B; accept the licence on "
                           "huggingface.co and log in first)")
PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")  # the pipeline classes a flux2 folder may name


def pipeline_class_name(folder: Path) -> str:
    """The FLUX.2 pipeline class the folder's ``model_index.json`` names.

    Raises:
        ValueError: another pipeline, naming ``policy.path`` and the classes ``flux2`` loads.
    """
    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if name not in PIPELINES:
        raise ValueError(f"policy.path: {folder} holds a {name} folder, but flux2 loads {' or '.join(PIPELINES)}; "
                         f"set policy.path to a FLUX.2 folder, e.g. {FLUX2_FOLDER.download}")
    return name


def text_tokenizer(folder: Path) -> Any | None:
    """The tokenizer to load in place of the folder's ``PixtralProcessor`` (None when it names another class):
    ``AutoTokenizer`` over ``tokenizer/``, which tokenizes text-only chats as the processor does (module docstring).

    Raises:
        ValueError: the chat template does not start with the BOS token, so the two would tokenize differently.
    """
    from transformers import AutoTokenizer

    index = json.loads((folder / "model_index.json").read_text())
    if (index.get("tokenizer") or [None, None])[1] != "PixtralProcessor":
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    chat = [[{"role": "user", "content": [{"type": "text", "text": "x"}]}]]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)[0]
    if tokenizer.bos_token and not rendered.startswith(tokenizer.bos_token):
        raise ValueError(f"policy.path: {folder / 'tokenizer'}'s chat template does not start with the BOS token, so "
                         "its PixtralProcessor would add one the tokenizer alone does not; download the folder again")
    return tokenizer


@register_policy("flux2", FLUX2_FOLDER)
def build_flux2_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                       height: int = 1024, width: int = 1024, max_sequence_length: int = 512,
                       guidance_scale: float = 4.0) -> Flux2Policy:
    """Load a local diffusers FLUX.2 [dev] or [klein] folder offline (``from_pretrained(local_files_only=True)``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer, vae, text_encoder, tokenizer).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        height: Image height in pixels, a multiple of 16 (twice the VAE scale); sets ``latent_shape``.
        width: Image width in pixels, likewise.
        max_sequence_length: Text tokens per prompt (the pipelines' 512).
        guidance_scale: The pipeline's ``guidance_scale``: embedded guidance for [dev] (its default 4), true CFG for
            [klein] base models when above 1 (4 in BFL's examples); step-distilled [klein] ignores it.

    Returns:
        The policy; the text encoder and the VAE are frozen.
    """
    import diffusers

    folder = local_folder(path, FLUX2_FOLDER, dtype)
    pipeline_cls = getattr(diffusers, pipeline_class_name(folder))
    check_folder_size(folder, "flux2", flux_size_rule, ("vae",), height, width)  # before any weights load
    tokenizer = text_tokenizer(folder)
    components = {} if tokenizer is None else {"tokenizer": None}  # a PixtralProcessor: set below, not loaded
    pipe = load_local_pipeline(pipeline_cls, path, FLUX2_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder"), components=components)
    if tokenizer is not None:
        pipe.tokenizer = tokenizer
    return Flux2Policy(pipe, height, width, max_sequence_length, guidance_scale, compute_dtype=DTYPES[dtype])
