"""Policies (layer 4, the model boundary): flow-matching generators behind one contract (``FlowPolicy``) and a name
registry. May import the root modules, math and tasks; diffusers/transformers only inside factories.

Registered: ``digits`` (built-in tiny FLUX on 8x8 digits, shipped weights), ``numbers`` (the same on 8x16
two-digit numbers, shipped weights), ``flux1`` (a local diffusers FLUX.1 folder), ``flux_kontext`` (FLUX.1 Kontext,
editing an input image), ``flux2`` (FLUX.2 [dev] and [klein]), ``sd3`` (SD3 / SD3.5 with classifier-free guidance),
``wan`` (Wan 2.1 / 2.2 text-to-video), ``qwen_image`` (Qwen-Image), ``qwen_image_edit`` (Qwen-Image-Edit, editing
an input image; -2509 / -2511, several), ``hunyuan_video`` (HunyuanVideo text-to-video, embedded guidance); ``sd15`` and ``sdxl`` (Stable
Diffusion 1.x and XL, diffusion models on the DDIM step family); ``z_image`` (Z-Image and the distilled
Z-Image-Turbo).
Importing this package is light; diffusers and transformers load inside the factories.
"""

from flowgrove.policies.base import Conditioning, FlowPolicy, build_policy, policy_family, policy_names, register_policy
from flowgrove.policies.digits import build_digits_policy, digit_of_prompt, digit_prompts
from flowgrove.policies.flux import FluxAdapter, build_flux1_policy, pack_latents, unpack_latents
from flowgrove.policies.flux2 import Flux2Policy, build_flux2_policy  # noqa: F401 (registers "flux2")
from flowgrove.policies.flux_kontext import FluxKontextPolicy, build_flux_kontext_policy  # noqa: F401 (registers "flux_kontext")
from flowgrove.policies.numbers import build_numbers_policy  # noqa: F401 (registers "numbers")
from flowgrove.policies.hunyuan_video import HunyuanVideoPolicy, build_hunyuan_video_policy  # noqa: F401 (registers "hunyuan_video")
from flowgrove.policies.qwen_image import QwenImagePolicy, build_qwen_image_policy
from flowgrove.policies.qwen_image_edit import QwenImageEditPolicy, build_qwen_image_edit_policy  # noqa: F401 (registers "qwen_image_edit")
from flowgrove.policies.sd15 import SD15Policy, build_sd15_policy  # noqa: F401 (registers "sd15")
from flowgrove.policies.sd3 import SD3Policy, build_sd3_policy  # noqa: F401 (registers "sd3")
from flowgrove.policies.sdxl import SDXLPolicy, build_sdxl_policy  # noqa: F401 (registers "sdxl")
from flowgrove.policies.wan import WanPolicy, build_wan_policy
from flowgrove.policies.z_image import ZImagePolicy, build_z_image_policy  # noqa: F401 (registers "z_image")

__all__ = [
    "Conditioning",
    "FlowPolicy",
    "FluxAdapter",
    "QwenImagePolicy",
    "WanPolicy",
    "build_digits_policy",
    "build_flux1_policy",
    "build_qwen_image_policy",
    "build_policy",
    "build_wan_policy",
    "digit_of_prompt",
    "digit_prompts",
    "pack_latents",
    "policy_family",
    "policy_names",
    "register_policy",
    "unpack_latents",
]
