"""CLIP-family preprocessing shared by every image-text reward: resize, crop or letterbox, normalise; text cleaning.

One copy of each transform the references use (rewards.md sections 1-5), on batched tensors ``[B, 3, H, W]``:

* ``crop``: shortest edge to ``size`` (long edge ``int(size * long / short)``), then a centre crop. This is
  transformers' ``CLIPImageProcessor`` (PickScore, aesthetic, CLIP score; crop offset ``floor``) and
  torchvision's ``Resize`` + ``CenterCrop`` (ImageReward; crop offset ``round``).
* ``letterbox``: longest edge to ``size`` (``round``), black padding (HPSv2's ``ResizeMaxSize``).
* ``squash``: both edges to ``size`` (open_clip ``resize_mode="squash"``, DFN5B).

The references resize uint8 PIL images (``backend="pil"``, bit-exact, CPU) except HPS, whose resize runs on a
float tensor after ``ToTensor`` (``backend="torch"``: antialiased bicubic, torchvision's tensor path, any device).
"""

from __future__ import annotations

import html
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

Mode = Literal["crop", "letterbox", "squash"]
Backend = Literal["pil", "torch"]


class ImageTransform(NamedTuple):
    """How a reward turns images in [0, 1] into model pixels (see the module docstring for the modes)."""

    mode: Mode  # "crop", "letterbox" or "squash"
    size: int  # output height and width
    backend: Backend = "pil"  # "pil": uint8 PIL bicubic (bit-exact with the references); "torch": float, batched
    crop_rounding: Literal["floor", "round"] = "floor"  # centre-crop offset: transformers floor, torchvision round
    quantize: bool = True  # round to uint8 levels first, as the references' PIL round trip does
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


def to_uint8(images: Tensor) -> Tensor:
    """``(x * 255).round().clamp(0, 255)`` as uint8, the references' float-to-PIL conversion (Flow-GRPO)."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the short edge ``size`` and the long edge ``int(size * long / short)`` (HF and torchvision)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def longest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the long edge ``size``: ``round(edge * size / max(h, w))`` (HPSv2 ``ResizeMaxSize``)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def resize_bicubic(images: Tensor, size: tuple[int, int], backend: Backend) -> Tensor:
    """Bicubic resize of ``[B, 3, H, W]`` to ``[B, 3, *size]``.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        size: ``(height, width)`` of the output.
        backend: ``"pil"``: uint8 per image through PIL (the references' pixels, CPU); ``"torch"``:
            ``F.interpolate(bicubic, antialias=True)`` on float (torchvision's tensor resize), unclamped.

    Returns:
        ``[B, 3, *size]`` float32 on the images' device.
    """
    if backend not in ("pil", "torch"):
        raise ValueError(f"unknown resize backend {backend!r}; choose 'pil' or 'torch'.")
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    if backend == "torch":
        return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    import numpy as np
    from PIL import Image

    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3] uint8
    resized = [np.asarray(Image.fromarray(p).resize(size[::-1], Image.BICUBIC)) for p in pixels]
    out = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)  # [B, 3, h, w] uint8
    return out.to(images.device, torch.float32) / 255


def center_crop(images: Tensor, size: int, rounding: Literal["floor", "round"]) -> Tensor:
    """Centre ``size x size`` crop; the offset is ``(H - size) // 2`` (floor) or ``int(round((H - size) / 2))``."""
    height, width = images.shape[-2:]
    offset = (lambda n: (n - size) // 2) if rounding == "floor" else (lambda n: int(round((n - size) / 2.0)))
    top, left = offset(height), offset(width)
    return images[..., top:top + size, left:left + size]


def letterbox(images: Tensor, size: int, backend: Backend) -> Tensor:
    """Longest edge to ``size``, then pad with 0 to ``size x size`` (HPSv2 ``ResizeMaxSize``, before Normalize)."""
    height, width = images.shape[-2:]
    if max(height, width) == size:  # ResizeMaxSize leaves the image alone when the scale is 1
        return images.float()
    new_h, new_w = longest_edge_size(height, width, size)
    resized = resize_bicubic(images, (new_h, new_w), backend)  # [B, 3, new_h, new_w]
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(resized, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean) / std`` per channel of ``[B, 3, H, W]``."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def preprocess(images: Tensor, transform: ImageTransform) -> Tensor:
    """Model pixels ``[B, 3, size, size]`` float32 from images ``[B, 3, H, W]`` in [0, 1]."""
    if transform.quantize:
        images = to_uint8(images).float() / 255  # [B, 3, H, W], the uint8 levels the references see
    height, width = images.shape[-2:]
    if transform.mode == "letterbox":
        pixels = letterbox(images, transform.size, transform.backend)
    elif transform.mode == "squash":
        pixels = resize_bicubic(images, (transform.size, transform.size), transform.backend)
    else:
        resized = resize_bicubic(images, shortest_edge_size(height, width, transform.size), transform.backend)
        pixels = center_crop(resized, transform.size, transform.crop_rounding)
    return normalize(pixels, transform.mean, transform.std)  # [B, 3, size, size]


def transform_from_processor(processor: object, backend: Backend = "pil") -> ImageTransform:
    """The ``crop`` transform a transformers ``CLIPImageProcessor`` applies, read from its size, crop and mean/std."""
    size = processor.size  # type: ignore[attr-defined]
    crop = processor.crop_size  # type: ignore[attr-defined]
    short = size["shortest_edge"] if "shortest_edge" in size else size["height"]
    if crop["height"] != crop["width"] or short != crop["height"]:
        raise ValueError(f"expected a square crop equal to the resize edge, got size {dict(size)} crop {dict(crop)}.")
    return ImageTransform("crop", int(short), backend, "floor", True,
                          tuple(processor.image_mean), tuple(processor.image_std))  # type: ignore[attr-defined]


def clean_prompt(text: str) -> str:
    """open_clip's text clean (``_clean_lower``): ftfy fix (when installed), HTML unescape twice, collapse spaces, lower.

    HF's ``CLIPTokenizer`` gives open_clip's ids only after this step (rewards.md section 1.3).
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake and curly quotes; ids differ only for such prompts
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()

