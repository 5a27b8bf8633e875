"""Qwen-Image-Edit adapter: image editing with Qwen-Image's transformer (diffusers ``QwenImageEditPipeline``).

Everything of ``qwen_image`` holds (packing, the exact-``sigma`` timestep, zero-padded text states and their mask,
true CFG with the pipeline's rescale, the float32 VAE, decoding, exports); the edit adds the prompt row's input
image twice, as the pipeline does:

* **to the text encoder**: Qwen2.5-VL reads the edit template with the image in it (``encode_prompt(image=...)``),
  so the text states carry the image's vision tokens; the CFG negative prompt is encoded with each row's image too
  and kept per row in ``Conditioning.negative_prompt_embeds``;
* **to the transformer**: the image resized to ``calculate_dimensions(image_area, width / height)`` (the pipeline's
  own function; its ``image_area`` is 1024^2), ``VaeImageProcessor.preprocess``, the pipeline's ``_encode_vae_image``
  (the VAE's mode, normalised by ``latents_mean`` / ``latents_std``), packed 2x2 into ``Conditioning.image_latents``
  ``[B, N, 4C]``; at every step those tokens follow the latent's, with their own ``img_shapes`` entry, and the
  latent's part of the output is the velocity (``__call__``'s ``torch.cat([latents, image_latents], dim=1)`` and
  ``noise_pred[:, : latents.size(1)]``).

Both encodings happen once per prompt (``encode_prompts``), so ``encode-prompts`` caches them. The pipeline sizes
the input from the first image's aspect ratio; the policy uses the output's (``width / height``) for every row, so
all rows have one token count: give input images of the output's aspect ratio (others are stretched to it).
Each row equals the pipeline called on that row alone.

The processor: the folder's ``processor`` component is a ``Qwen2VLProcessor``, which transformers builds with
torchvision-backed image and video processors and refuses without torchvision. :func:`image_only_processor` builds
the same ``Qwen2VLProcessor`` class from the folder's ``processor/`` files with transformers' PIL image processor
(``Qwen2VLImageProcessorPil``) and no video processor, and the pipeline's own encoding code runs on it unchanged.
Its bicubic resize is PIL's; transformers' torchvision image processor (the one chosen where torchvision loads)
resizes slightly differently, so vision features can differ from a torchvision install at the resize's precision.

``QwenImageEditPlusPipeline`` (2509: several input images, a 384^2 copy for the text encoder and a 1024^2 one for
the VAE) is not covered: its encoding differs, and it needs its own adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import pack_latents
from flowgrove.policies.pipelines import DTYPES, LocalFolder, input_images, local_folder
from flowgrove.policies.qwen_image import QwenImagePolicy, load_qwen_pipeline


def image_only_processor(folder: Path) -> Any:
    """The folder's ``processor/`` as a ``Qwen2VLProcessor`` whose image processor is transformers' PIL one and which
    has no video processor (module docstring): the tokenizer, its chat template and ``preprocessor_config.json``
    read from ``processor/``."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` that accepts a missing (None) video processor: images and text only."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    source = folder / "processor"
    return ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(source)),
                                     tokenizer=AutoTokenizer.from_pretrained(str(source)))


class QwenImageEditPolicy(QwenImagePolicy):
    """A diffusers ``QwenImageEditPipeline`` as a ``FlowPolicy``: ``qwen_image`` conditioned on each prompt's input
    image (module docstring)."""

    FAMILY = "qwen_image_edit"

    def __init__(self, pipe: Any, height: int, width: int, max_sequence_length: int, guidance_scale: float = 1.0,
                 negative_prompt: str = " ", guidance: float | None = None, image_area: int = 1024 * 1024,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        super().__init__(pipe, height, width, max_sequence_length, guidance_scale, negative_prompt, guidance,
                         compute_dtype)
        image_width, image_height, _ = calculate_dimensions(image_area, int(width) / int(height))
        self.image_size = (int(image_height), int(image_width))  # the input image's pixels for the VAE
        side = 2 * pipe.vae_scale_factor
        self.image_grid = (self.image_size[0] // side, self.image_size[1] // side)  # its 2x2 token grid

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """Packed, normalised VAE tokens ``[B, N, 4C]`` of PIL ``images`` (each already at ``image_size``)."""
        pipe, vae = self.pipe, self.pipe.vae
        pixels = pipe.image_processor.preprocess(list(images), *self.image_size).unsqueeze(2)  # [B, 3, 1, H, W]
        with torch.no_grad():
            latents = pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None)  # [B, C, 1, h, w]
        return pack_latents(latents[:, :, 0])  # [B, N, 4C]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Qwen2.5-VL states of the edit template with each row's input image (and, under CFG, of the negative
        prompt with it), and the image's VAE tokens.

        Raises:
            ValueError: a prompt without an input image, or more tokens than ``max_sequence_length``.
        """
        shown = [self.pipe.image_processor.resize(image, *self.image_size)
                 for image in input_images(prompts, self.FAMILY)]  # the pipeline's resize of one input image
        negative = None
        if self.guidance_scale > 1:
            negative = self._encode([self.negative_prompt] * len(shown), shown)  # [B, L, D]
        return Conditioning(self._encode(prompts, shown), negative_prompt_embeds=negative,
                            image_latents=self.encode_images(shown))


QWEN_EDIT_FOLDER = LocalFolder("qwen_image_edit", "Qwen-Image-Edit",
                               "`hf download Qwen/Qwen-Image-Edit --local-dir /models/Qwen-Image-Edit`", input_images="*")


@register_policy("qwen_image_edit", QWEN_EDIT_FOLDER)
def build_qwen_image_edit_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                                 height: int = 1024, width: int = 1024, max_sequence_length: int = 2048,
                                 guidance_scale: float = 1.0, negative_prompt: str = " ", guidance: float | None = None,
                                 image_area: int = 1024 * 1024) -> QwenImageEditPolicy:
    """Load a local diffusers Qwen-Image-Edit folder offline (``QwenImageEditPipeline``, its processor built by
    :func:`image_only_processor`); the options are :func:`flowgrove.policies.qwen_image.build_qwen_image_policy`'s
    (``max_sequence_length`` now counts the input image's vision tokens too, about 1400 at 1024^2) and
    ``image_area``, the pixel area of the input image the VAE encodes (the pipeline's 1024^2)."""
    from diffusers import QwenImageEditPipeline

    processor = image_only_processor(local_folder(path, QWEN_EDIT_FOLDER, dtype))
    pipe = load_qwen_pipeline(QwenImageEditPipeline, QWEN_EDIT_FOLDER, path, device, dtype, height, width,
                              components={"processor": processor})
    return QwenImageEditPolicy(pipe, height, width, max_sequence_length, guidance_scale, negative_prompt, guidance,
                               image_area, compute_dtype=DTYPES[dtype])
