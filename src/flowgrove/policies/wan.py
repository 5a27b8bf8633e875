"""Wan adapter: text-to-video through diffusers ``WanPipeline`` components (Wan 2.1, Wan 2.2 T2V / TI2V), and
image-to-video through ``WanImageToVideoPipeline`` ones (Wan 2.1 I2V with its CLIP image encoder, Wan 2.2 A14B I2V)
and ``SkyReelsV2ImageToVideoPipeline`` ones (the same loop with a ``SkyReelsV2Transformer3DModel``).

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
and the others to ``transformer_2``, as the pipeline does; ``expert`` picks which one trains (``module``): ``high``,
``low``, or ``both`` (:class:`WanExperts`: each stored transition trains the expert that produced it, since the
re-scoring forward routes it by its sigma as the rollout did).
Image-to-video: the prompt row's input image (``prompt.metadata["image"]``) is encoded once with the prompt into
the pipeline's first-frame condition (:meth:`WanPolicy.encode_images`), concatenated to the latents on the channel
axis at every call (``torch.cat([latents, condition], dim=1)``), CFG halves alike, as ``__call__`` does.
Schedule: the folders ship ``FlowMatchEulerDiscreteScheduler`` (Wan 2.1) or ``UniPCMultistepScheduler`` with
``use_flow_sigmas`` (Wan 2.2); flowgrove never runs the folder's scheduler but samples its own flow-match steps on
``sampler.shift``'s grid, which is the folder's sigma grid when ``sampler.shift`` is the folder's shift
(:func:`wan_schedule`; UniPC's solver itself is not used).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import DTYPES, per_sample_sigma
from flowgrove.policies.pipelines import (LocalFolder, SizeRule, check_folder_size, check_size, decode_wan_vae,
                                         input_images, load_local_pipeline, local_folder, save_pipeline_folder,
                                         save_pipeline_lora)
from flowgrove.policies.wan_folder import (COMPONENTS, LOW_NOISE_LORA, WanExperts, WanSchedule, check_expert,
                                           read_wan_folder, read_wan_schedule, split_experts_state, wan_schedule)

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
    return (pipe.vae.config.z_dim, (int(num_frames) - 1) // temporal + 1, int(height) // spatial,
            int(width) // spatial)


class WanPolicy:
    """A diffusers ``WanPipeline`` as a ``FlowPolicy`` on 5-D video latents (Wan-AI Wan 2.1 / 2.2)."""

    def __init__(self, pipe: WanPipeline, num_frames: int, height: int, width: int, max_sequence_length: int,
                 guidance_scale: float = 1.0, negative_prompt: str = "", expert: str = "high",
                 compute_dtype: torch.dtype = torch.float32, schedule: WanSchedule | None = None) -> None:
        experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
        check_expert(expert, len(experts), Path(pipe.name_or_path or "the pipeline"))
        self.pipe = pipe
        self.experts = experts
        self.boundary = pipe.config.boundary_ratio if len(experts) == 2 else None
        self.expert = expert
        self._pair = WanExperts(*experts) if expert == "both" else None
        scheduler = {"_class_name": type(pipe.scheduler).__name__, **pipe.scheduler.config}
        self.schedule = schedule or wan_schedule(scheduler)
        self.latent_shape = wan_latent_shape(pipe, num_frames, height, width)
        self.size = (int(num_frames), int(height), int(width))  # pixels, for the input image's condition
        self.image_to_video = "image_encoder" in pipe.components  # WanImageToVideoPipeline: the row's first frame
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.compute_dtype = compute_dtype
        self._negative: Tensor | None = None  # [1, L, D], encoded on first use

    @property
    def trained(self) -> tuple[int, ...]:
        """Indices into ``experts`` of the trained ones (0: ``transformer``, 1: ``transformer_2``)."""
        return {"high": (0,), "low": (1,), "both": (0, 1)}[self.expert]

    @property
    def frozen_modules(self) -> list[nn.Module]:
        """The untrained expert of a two-expert folder (``expert=high|low``): it computes its side of the boundary
        in rollouts and training alike, frozen; ``policy.quantize`` quantises it too."""
        return [m for i, m in enumerate(self.experts) if i not in self.trained]

    @property
    def module(self) -> nn.Module:
        """The trained module: ``transformer``, ``transformer_2`` (``expert="low"``) or both (:class:`WanExperts`)."""
        return self._pair if self._pair is not None else self.experts[self.trained[0]]

    @module.setter
    def module(self, value: nn.Module) -> None:
        if self._pair is not None:
            self._pair, self.experts = value, list(value.experts)
        else:
            self.experts[self.trained[0]] = value

    def _encode(self, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
                device=self.pipe.text_encoder.device,
            )  # [B, L, D], zero past each prompt's tokens
        return embeds

    def encode_images(self, images: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
        """The first-frame condition of each input image (no grad), as ``WanImageToVideoPipeline.__call__`` builds it:
        ``video_processor.preprocess`` to the policy's size, then the pipeline's own ``prepare_latents`` (the image
        and ``F - 1`` zero (mid-grey) frames through the VAE, normalised, after the 4-channel first-frame mask), and
        Wan 2.1's CLIP states (``encode_image``, the vision tower's second-to-last layer; None without an image
        encoder).

        Returns:
            ``(condition [B, 4 + C, F', H', W'], image_embeds [B, N, D'] or None)``.
        """
        pipe, (frames, height, width) = self.pipe, self.size
        device, conditions, clip = pipe.vae.device, [], []
        with torch.no_grad():
            for image in images:  # one at a time: prepare_latents repeats one image over its batch
                pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
                zeros = torch.zeros(1, *self.latent_shape, device=device)  # latents given: nothing random is drawn
                _, condition = pipe.prepare_latents(pixels, 1, self.latent_shape[0], height, width, frames,
                                                    torch.float32, device, latents=zeros)
                conditions.append(condition)  # [1, 4 + C, F', H', W']
                if pipe.image_encoder is not None:
                    clip.append(pipe.encode_image(image, device))  # [1, N, D']
        return torch.cat(conditions), torch.cat(clip) if clip else None

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """UMT5 token states through ``WanPipeline.encode_prompt`` (no grad), zero-padded to ``max_sequence_length``;
        image-to-video adds each row's input image (``prompt.metadata["image"]``, :meth:`encode_images`) as
        ``image_latents`` (and ``image_embeds``)."""
        images = input_images(prompts, "wan image-to-video") if self.image_to_video else None  # before UMT5 runs
        if self.guidance_scale > 1 and self._negative is None:
            self._negative = self._encode([self.negative_prompt])  # [1, L, D]
        if images is None:
            return Conditioning(self._encode(prompts))
        condition, image_embeds = self.encode_images(images)
        return Conditioning(self._encode(prompts), image_latents=condition, image_embeds=image_embeds)

    def _forward(self, model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(model.parameters()).dtype
        condition = cond.image_latents  # [B, 4 + C, F', H', W'] image-to-video, else None
        hidden = x if condition is None else torch.cat([x, condition.to(x)], dim=1)  # [B, C (+ 4 + C), F', H', W']
        image = None if cond.image_embeds is None else cond.image_embeds.to(dtype)  # [B, N, D'] Wan 2.1 I2V
        timestep = 1000 * sigma  # [B]; WanPipeline feeds the scheduler's t = 1000 * sigma (module docstring)
        if self.pipe.config.get("expand_timesteps"):  # Wan 2.2 TI2V: one timestep per latent token
            timestep = timestep[:, None].expand(-1, x[0, 0, :, ::2, ::2].numel())  # [B, F' * ceil(H'/2) * ceil(W'/2)]
        autocast = torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with autocast:  # bf16/fp16 compute over the (float32 master) weights
            out = model(hidden_states=hidden.to(dtype), timestep=timestep,
                        encoder_hidden_states=cond.prompt_embeds.to(dtype), encoder_hidden_states_image=image,
                        return_dict=False)[0]  # [B, C, F', H', W']
        return out.to(x.dtype)
    def _expert_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Each row through the expert its sigma routes it to. A trained expert that gets no row while autograd is
        on runs on one row at weight 0, so that every micro-batch's loss reaches the trained weights (zero gradients
        where they produced no transition), as ``backward`` and data-parallel reductions need."""
        if self.boundary is None:
            return self._forward(self.experts[0], x, sigma, cond)
        high = 1000 * sigma >= self.boundary * self.pipe.scheduler.config.num_train_timesteps  # [B]
        out = torch.empty_like(x)
        for expert, rows in ((0, high), (1, ~high)):
            if rows.any():
                out[rows] = self._forward(self.experts[expert], x[rows], sigma[rows], cond.select(rows.nonzero()[:, 0]))
        idle = [e for e, rows in ((0, high), (1, ~high)) if e in self.trained and not rows.any()]
        if idle and torch.is_grad_enabled():
            out = out + 0 * self._forward(self.experts[idle[0]], x[:1], sigma[:1], cond.select([0])).sum()
        return out  # [B, C, F', H', W']

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Velocity ``v = noise - x0`` of the Wan transformer, with CFG when ``guidance_scale > 1``.

        Args:
            x: Latents ``[B, C, F', H', W']``.
            sigma: Noise levels ``[B]`` (or a scalar), 1 = noise; fed as ``timestep = 1000 * sigma``.
            cond: Conditioning with ``B`` rows (``prompt_embeds [B, L, D]``; image-to-video: ``image_latents``
                ``[B, 4 + C, F', H', W']`` and Wan 2.1's ``image_embeds``, the same for both CFG halves, as the
                pipeline).

        Returns:
            Velocity ``[B, C, F', H', W']`` in ``x.dtype``.
        """
        b = x.shape[0]
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows but x has {b}; use cond.select(...) to match the batch.")
        sigma = per_sample_sigma(sigma, b, x.device)  # [B]
        if self.guidance_scale <= 1:
            return self._expert_velocity(x, sigma, cond)
        negative = self._negative.to(cond.prompt_embeds).expand(b, -1, -1)  # [B, L, D]
        both = dataclasses.replace(cond.select(torch.arange(b).repeat(2)),  # [2B, ...]: the image rows twice
                                   prompt_embeds=torch.cat([cond.prompt_embeds, negative]))  # [2B, L, D]
        v, v_neg = self._expert_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return v_neg + self.guidance_scale * (v - v_neg)

    def decode(self, x: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in [0, 1] (``WanPipeline.__call__``'s decode, ``postprocess_video``)."""
        return decode_wan_vae(self.pipe.vae, x).transpose(1, 2).to(x.dtype)  # [B, F, 3, H, W]

    def offload_text_encoders(self) -> None:
        """Move UMT5 to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")

    def export_lora(self, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
        """diffusers' Wan LoRA files in ``out``, one per trained expert (``WanPipeline.save_lora_weights``):
        ``pipe.load_lora_weights(out)`` loads the high-noise one into ``transformer``; the low-noise one (``"low"``:
        the same file name; ``"both"``: :data:`LOW_NOISE_LORA`, ``weight_name=``) loads with
        ``load_into_transformer_2=True``; each load leaves the other expert untouched (:meth:`lora_usage`)."""
        parts = split_experts_state(state) if self._pair is not None else {COMPONENTS[self.trained[0]]: state}
        for component, expert_state in parts.items():
            name = LOW_NOISE_LORA if component == "transformer_2" and self._pair is not None else None
            save_pipeline_lora(type(self.pipe), expert_state, lora_config, out, weight_name=name)

    def lora_usage(self, out: str) -> list[str]:
        """The Python lines that load :meth:`export_lora`'s files into the base pipeline ``pipe``."""
        load = f"pipe.load_lora_weights({out!r}"
        return {"high": [f"{load})"], "low": [f"{load}, load_into_transformer_2=True)"],
                "both": [f"{load})", f"{load}, weight_name={LOW_NOISE_LORA!r}, load_into_transformer_2=True)"],
                }[self.expert]

    def export_full(self, out: Path) -> None:
        """A pipeline folder in ``out`` with the trained experts in ``transformer/`` and/or ``transformer_2/``
        (``save_pipeline_folder``): ``WanPipeline.from_pretrained(out)``, or
        ``WanTransformer3DModel.from_pretrained(out, subfolder=...)``."""
        save_pipeline_folder(self.pipe, {COMPONENTS[i]: self.experts[i] for i in self.trained}, out)


WAN_FOLDER = LocalFolder("wan", "Wan", "`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir "
                         "/models/Wan2.1-T2V-1.3B` (or Wan-AI/Wan2.2-T2V-A14B-Diffusers, "
                         "Wan-AI/Wan2.2-TI2V-5B-Diffusers, Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)",
                         input_images="ImageToVideo")


@register_policy("wan", WAN_FOLDER)
def build_wan_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                     num_frames: int = 81, height: int = 480, width: int = 832, max_sequence_length: int = 512,
                     guidance_scale: float = 5.0, negative_prompt: str = "", expert: str = "high") -> WanPolicy:
    """Load a local diffusers Wan folder offline (``WanPipeline.from_pretrained(local_files_only=True)``).

    Args:
        path: The diffusers folder (``model_index.json``, transformer(s), vae, text_encoder, tokenizer, scheduler).
        device: Where every component goes.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the transformer(s) and UMT5; the VAE stays float32.
        num_frames: Video frames, ``4k + 1`` (others are refused, not rounded as the pipeline does). 1 gives images.
        height: Pixels, a multiple of the VAE scale times the patch (16; 32 for Wan 2.2 TI2V-5B, :func:`wan_size_rule`).
        width: Pixels, likewise.
        max_sequence_length: UMT5 tokens per prompt (the pipeline's 512).
        guidance_scale: Classifier-free guidance scale (the pipeline's 5.0); 1 or less turns CFG off.
        negative_prompt: The CFG negative prompt.
        expert: Wan 2.2 A14B: train the high-noise ``transformer`` (``high``), ``transformer_2`` (``low``) or both
            (``both``, each on the transitions it produced).

    Returns:
        The policy; UMT5, the VAE and an untrained second expert are frozen.

    Raises:
        ConfigError: a size the pipeline would round, an ``expert`` the folder does not have, or a scheduler
            without flow-matching sigmas (all before any weights load).
    """
    import diffusers

    folder = local_folder(path, WAN_FOLDER, dtype)
    check_folder_size(folder, "wan", wan_size_rule, ("vae", "transformer"), height, width, num_frames)
    info = read_wan_folder(folder)
    check_expert(expert, info.experts, folder)
    schedule = read_wan_schedule(folder)
    pipe = load_local_pipeline(getattr(diffusers, info.pipeline), path, WAN_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder", "image_encoder"), float32_vae=diffusers.AutoencoderKLWan)
    policy = WanPolicy(pipe, num_frames, height, width, max_sequence_length, guidance_scale, negative_prompt, expert,
                       compute_dtype=DTYPES[dtype], schedule=schedule)
    for index, frozen in enumerate(policy.experts):
        if index not in policy.trained:
            frozen.requires_grad_(False).eval()
    return policy
