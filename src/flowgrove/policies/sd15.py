"""SD1.x adapter: Stable Diffusion 1.4 / 1.5 (and 2.x, v-prediction) through ``StableDiffusionPipeline``'s parts.

A diffusion model, not a rectified flow: ``velocity`` returns the UNet's output (``eps``, or ``v`` for
``prediction_type="v_prediction"``), and the policy's ``step_family`` (DDIM with eta, DPM-Solver++(2M) tails;
:mod:`flowgrove.samplers.family`) tells rollouts and the re-score what it means. The rollout coordinate
``sigma`` in [0, 1] is a timestep fraction: the UNet sees ``tau = sigma * T - 1`` (``T = 1000``), so the grid
``linspace(1, 0, N + 1)`` is diffusers' ``timestep_spacing="trailing"`` DDIM grid ``[999, 999 - 1000/N, ...]``
and the last step goes to ``alphas_cumprod[0]`` (below). The noise table is the
one ``DDIMScheduler.from_config`` builds from the folder's scheduler config, whatever class ships it (SD1.5's
``PNDMScheduler``, SDXL's ``EulerDiscreteScheduler``, ``DDIMScheduler``): beta schedule, zero-terminal-SNR
rescale; the pipeline's own sampler is not used (one note line says so). The last step ends at ``alphas_cumprod[0]``
(DDIM's ``set_alpha_to_one=False``, as SD1.x ships it): a step to ``alphas_cumprod = 1`` draws no noise, so a
trained last step would have no log-prob.

Classifier-free guidance lives in :meth:`SD15Policy.velocity` as in the pipeline's loop (DanceGRPO's SD recipe,
CFG 5.0): one UNet call on ``[uncond; cond]``, then ``e_u + s * (e_c - e_u)``.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowgrove.messages import note
from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import per_sample_sigma
from flowgrove.policies.pipelines import (DTYPES, LocalFolder, PipelineExports, check_folder_size, decode_sd_vae,
                                          load_local_pipeline, local_folder, unet_latent_shape, unet_size_rule)
from flowgrove.samplers.family import DiffusionSchedule, diffusion_steps

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def has_beta_table(scheduler_config: Mapping) -> bool:
    """Whether the config's scheduler class computes its noise table from DDPM betas (``beta_schedule``: DDIM, PNDM,
    Euler, DPM-Solver, ...; not the EDM or flow-matching schedulers)."""
    import diffusers

    cls = getattr(diffusers, str(scheduler_config.get("_class_name", "")), None)
    return "beta_schedule" in (inspect.signature(cls.__init__).parameters if cls is not None else scheduler_config)


def ddim_schedule(scheduler_config: Mapping) -> DiffusionSchedule:
    """The noise table of ``DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=False)`` (so every beta
    schedule and the zero-terminal-SNR rescale are diffusers' own), its final value ``alphas_cumprod[0]`` and the
    prediction type, from any DDPM scheduler's config (module docstring).

    Raises:
        ValueError: the scheduler has no beta table (:func:`has_beta_table`).
    """
    from diffusers import DDIMScheduler

    if not has_beta_table(scheduler_config):
        raise ValueError(f"the folder's {scheduler_config.get('_class_name', 'scheduler')} has no DDPM noise table "
                         "(beta_schedule), which flowgrove's DDIM steps need; use a folder whose scheduler/"
                         "scheduler_config.json is a DDIM, PNDM or Euler scheduler's (beta_start, beta_end, "
                         "beta_schedule, prediction_type)")
    ddim = DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=False)
    return DiffusionSchedule(ddim.alphas_cumprod.clone(), float(ddim.final_alpha_cumprod),
                             str(ddim.config.prediction_type))


def schedule_note(family: str, scheduler_config: Mapping) -> str | None:
    """One line on how the policy's DDIM steps differ from the folder's scheduler (module docstring); None for a
    ``DDIMScheduler`` with ``set_alpha_to_one=False``, which they equal."""
    name = str(scheduler_config.get("_class_name", "DDIMScheduler"))
    table = f"{scheduler_config.get('beta_schedule')} betas, {scheduler_config.get('prediction_type', 'epsilon')}"
    if name != "DDIMScheduler":
        return (f"{family}: rollouts take DDIM steps on the noise table of the folder's {name} ({table}), ending at "
                "alphas_cumprod[0]; the pipeline's own sampler is not used")
    if scheduler_config.get("set_alpha_to_one", True):
        return (f"{family}: the folder's DDIMScheduler has set_alpha_to_one=true; rollouts end at alphas_cumprod[0] "
                "instead (set_alpha_to_one=false), since a last step to 1 draws no noise to train")
    return None


def folder_schedule(path: str, spec: LocalFolder, dtype: str, height: int, width: int) -> DiffusionSchedule:
    """What an SD1.x / SDXL folder decides before any weights load: the dtype and the folder (:func:`local_folder`),
    the sizes (:func:`unet_size_rule`) and the DDIM schedule of its scheduler config (:func:`ddim_schedule`, with
    :func:`schedule_note`'s line on stderr).

    Raises:
        ValueError: an unknown ``dtype``, or a scheduler without a beta table.
        FileNotFoundError: ``path`` is not a diffusers folder (what to download).
        ConfigError: ``height`` or ``width`` is not a multiple of the VAE scale.
    """
    folder = local_folder(path, spec, dtype)
    check_folder_size(folder, spec.family, unet_size_rule, ("vae",), height, width)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    schedule = ddim_schedule(config)
    line = schedule_note(spec.family, config)
    if line is not None:
        note(line)
    return schedule


class SD15Policy(PipelineExports):
    """A diffusers ``StableDiffusionPipeline`` as a policy of the diffusion step family, with CFG in ``velocity``.

    Attributes:
        step_family: DDIM-with-eta steps on the folder's noise table (what rollouts and re-scores use).
        schedule: The noise table and prediction type.
        guidance_scale: CFG scale ``s``; CFG is on when ``s > 1``.
        negative: ``negative_prompt_embeds [1, L, D]`` of ``negative_prompt`` (None without CFG).
    """

    TRAINED = "unet"

    def __init__(self, pipe: StableDiffusionPipeline, guidance_scale: float, height: int, width: int,
                 negative_prompt: str = "", compute_dtype: torch.dtype = torch.float32,
                 schedule: DiffusionSchedule | None = None) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.guidance_scale = float(guidance_scale)
        self.compute_dtype = compute_dtype
        self.schedule = ddim_schedule(dict(pipe.scheduler.config)) if schedule is None else schedule
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

    def offload_text_encoders(self) -> None:
        """Move the text encoder to the CPU once the prompts are encoded (``policy.offload_text_encoders``)."""
        self.pipe.text_encoder.to("cpu")


SD15_FOLDER = LocalFolder("sd15", "Stable Diffusion 1.x",
                          "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir /models/sd15`")


@register_policy("sd15", SD15_FOLDER, family="diffusion")
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
        height: Image height in pixels, a multiple of the VAE scale (8); sets ``latent_shape``.
        width: Image width in pixels.

    Returns:
        The policy; its text encoder and VAE are frozen.
    """
    from diffusers import StableDiffusionPipeline

    schedule = folder_schedule(path, SD15_FOLDER, dtype, height, width)  # before any weights load
    pipe = load_local_pipeline(StableDiffusionPipeline, path, SD15_FOLDER, dtype=dtype, device=device,
                               frozen=("vae", "text_encoder"))
    return SD15Policy(pipe, guidance_scale, height, width, negative_prompt, compute_dtype=DTYPES[dtype],
                      schedule=schedule)
