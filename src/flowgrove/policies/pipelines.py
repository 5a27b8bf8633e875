"""Loading a local diffusers pipeline folder offline, shared by the families' factories (flux1, sd3, ...).

Light to import: diffusers is imported by the caller, which passes its pipeline class.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_local_pipeline(pipeline_cls: Any, path: str, *, dtype: str, device: str | torch.device, family: str,
                        folder: str, download: str, frozen: Sequence[str], float32_vae: Any = None) -> Any:
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` in ``dtype`` on ``device``, ``frozen``
    components in eval mode without gradients.

    Args:
        pipeline_cls: The diffusers pipeline class (``FluxPipeline``, ``StableDiffusion3Pipeline``, ...).
        path: The folder with ``model_index.json``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for all components.
        device: Where every component goes.
        family: The policy name, for the errors (``flux1``).
        folder: What the folder holds, for the errors (``FLUX.1``).
        download: How to get it, for the errors: the text after "Download it first, e.g. ".
        frozen: Names of the components to freeze (text encoders, VAE); absent or None ones are skipped.
        float32_vae: A VAE class to load from ``path/vae`` in float32 (Wan, Qwen-Image), as diffusers' examples do.

    Raises:
        ValueError: an unknown ``dtype``.
        FileNotFoundError: ``path`` is not a diffusers folder; the message says what to download.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if not path or not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{family} needs a local diffusers {folder} folder (with model_index.json), but {str(path) or '<empty path>'!r} "
            f"is not one. Download it first, e.g. {download}, then set policy.path to it."
        )
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        extra = {}
        if float32_vae is not None:
            extra["vae"] = float32_vae.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        pipe = pipeline_cls.from_pretrained(str(path), torch_dtype=DTYPES[dtype], local_files_only=True, **extra)
    pipe.to(device)
    for name in frozen:
        component = getattr(pipe, name, None)
        if component is not None:
            component.requires_grad_(False).eval()
    return pipe


def decode_wan_vae(vae: nn.Module, latents: Tensor) -> Tensor:
    """Pixels ``[B, 3, F, H, W]`` in [0, 1] from normalised latents ``[B, C, F', H', W']`` (Wan VAE; Qwen-Image's too).

    As the pipelines' decode: ``latents * latents_std + latents_mean`` per channel (they write it
    ``x / (1 / std) + mean``), ``vae.decode``, then ``VaeImageProcessor.postprocess``'s ``x / 2 + 0.5`` clamped.
    """
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=torch.float32).view(shape)
    pixels = vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1)


def save_pipeline_lora(pipeline_cls: Any, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
    """A LoRA file that ``pipeline_cls.load_lora_weights`` loads, written by the pipeline's own
    ``save_lora_weights``: the ``transformer.`` prefix, ``pytorch_lora_weights.safetensors``, the LoraConfig as
    metadata (FLUX, SD3, Wan and Qwen-Image share this signature).

    Args:
        pipeline_cls: The family's diffusers pipeline class (``FluxPipeline``, ``StableDiffusion3Pipeline``, ...).
        state: peft adapter state of the transformer (``get_peft_model_state_dict`` keys), scaling folded in
            (``flowgrove.export.folded_lora``).
        lora_config: ``LoraConfig`` keyword arguments that match ``state`` (stored in the file's metadata).
        out: The folder to write.
    """
    pipeline_cls.save_lora_weights(str(out), transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=lora_config)


def save_pipeline_folder(pipe: Any, module: nn.Module, out: Path, subfolder: str = "transformer") -> None:
    """A pipeline folder in ``out``: the base folder's other components copied, the trained ``module`` written with
    ``save_pretrained`` into ``out/subfolder`` (``from_pretrained(out)`` loads the pipeline, the transformer class's
    ``from_pretrained(out, subfolder=subfolder)`` the transformer).

    Raises:
        FileNotFoundError: the base folder the pipeline was loaded from (``policy.path``) is gone.
    """
    source = Path(pipe.name_or_path or "")
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"the base {type(pipe).__name__} folder {str(source)!r} (policy.path) is gone; export "
                                "needs it for the pipeline's other components: restore it or set policy.path")
    for entry in source.iterdir():
        if entry.name != subfolder:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, out / entry.name)
    module.save_pretrained(str(out / subfolder))
