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

Qwen-Image-Edit-2509 and -2511 folders (``model_index.json``'s ``_class_name`` ``QwenImageEditPlusPipeline``) load
the same way as :class:`QwenImageEditPlusPolicy`: a prompt row may give several input images (all rows of a batch
the same number, so their tokens stack), and each is used twice as that pipeline does:

* **to the text encoder**: a copy resized to ``calculate_dimensions(condition_area, its own aspect ratio)`` (the
  pipeline's ``CONDITION_IMAGE_SIZE`` 384^2), all of a row's copies in the edit template, each after its
  ``Picture i:`` label. The pipeline encodes one prompt at a time (it refuses batches), so the policy encodes each
  row alone too (and the negative prompt with each row's copies under CFG);
* **to the transformer**: a copy at ``image_size`` as above (the pipeline's ``VAE_IMAGE_SIZE`` 1024^2, at the
  output's aspect ratio where the pipeline takes each image's own), VAE-encoded and packed; a row's images' tokens
  follow the latent's one image after another (``Conditioning.image_latents`` ``[B, k * N, 4C]``), each with its
  ``img_shapes`` entry. 2511's ``zero_cond_t`` transformer (input-image tokens modulated at timestep 0) reads those
  entries itself.

A row equals ``QwenImageEditPlusPipeline`` called on it alone when its images have the output's aspect ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowgrove.messages import ConfigError
from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import pack_latents
from flowgrove.policies.pipelines import DTYPES, LocalFolder, input_image_sets, input_images, local_folder
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


# The pipelines' pixel areas (diffusers' VAE_IMAGE_SIZE and, for QwenImageEditPlusPipeline, CONDITION_IMAGE_SIZE).
IMAGE_AREA = 1024 * 1024
CONDITION_AREA = 384 * 384


class QwenImageEditPolicy(QwenImagePolicy):
    """A diffusers ``QwenImageEditPipeline`` as a ``FlowPolicy``: ``qwen_image`` conditioned on each prompt's input
    image (module docstring)."""

    FAMILY = "qwen_image_edit"

    def __init__(self, pipe: Any, height: int, width: int, max_sequence_length: int, guidance_scale: float = 1.0,
                 negative_prompt: str = " ", guidance: float | None = None, image_area: int = IMAGE_AREA,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        super().__init__(pipe, height, width, max_sequence_length, guidance_scale, negative_prompt, guidance,
                         compute_dtype)
        image_width, image_height, _ = calculate_dimensions(image_area, int(width) / int(height))
        self.image_size = (int(image_height), int(image_width))  # the input image's pixels for the VAE
        side = 2 * pipe.vae_scale_factor
        self.image_grid = (self.image_size[0] // side, self.image_size[1] // side)  # its 2x2 token grid

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """Packed, normalised VAE tokens ``[B, N, 4C]`` of PIL ``images``, each resized to ``image_size``."""
        pipe, vae = self.pipe, self.pipe.vae
        pixels = pipe.image_processor.preprocess(list(images), *self.image_size).unsqueeze(2)  # [B, 3, 1, H, W]
        with torch.no_grad():
            latents = pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None)  # [B, C, 1, h, w]
        return pack_latents(latents[:, :, 0])  # [B, N, 4C]

    def input_rows(self, prompts: Sequence[str]) -> list[list[Any]]:
        """Each prompt's input images as PIL images: one per prompt."""
        return [[image] for image in input_images(prompts, self.FAMILY)]

    def condition_image(self, image: Any) -> Any:
        """The copy of PIL ``image`` the text encoder reads: the pipeline's resize to ``image_size``."""
        return self.pipe.image_processor.resize(image, *self.image_size)

    def encode_text(self, prompts: Sequence[str], shown: Sequence[Sequence[Any]]) -> Tensor:
        """Text states ``[B, max_sequence_length, D]`` of ``prompts``, each with its row of ``shown`` images."""
        return self._encode(prompts, [row[0] for row in shown])

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Qwen2.5-VL states of the edit template with each row's input images (and, under CFG, of the negative
        prompt with them), and the images' VAE tokens ``[B, k * N, 4C]``.

        Raises:
            ValueError: a prompt without an input image (or with a number this folder does not take), or more
                tokens than ``max_sequence_length``.
        """
        rows = self.input_rows(prompts)  # B rows of k PIL images
        shown = [[self.condition_image(image) for image in row] for row in rows]
        negative = None
        if self.guidance_scale > 1:
            negative = self.encode_text([self.negative_prompt] * len(rows), shown)  # [B, L, D]
        latents = self.encode_images([image for row in rows for image in row])  # [B * k, N, 4C]
        return Conditioning(self.encode_text(prompts, shown), negative_prompt_embeds=negative,
                            image_latents=latents.reshape(len(rows), -1, latents.shape[-1]))  # [B, k * N, 4C]


class QwenImageEditPlusPolicy(QwenImageEditPolicy):
    """A diffusers ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / 2511) as a ``FlowPolicy``:
    ``qwen_image_edit`` with several input images per prompt, the text encoder reading a ``condition_area`` copy of
    each (module docstring)."""

    def __init__(self, pipe: Any, height: int, width: int, max_sequence_length: int, guidance_scale: float = 1.0,
                 negative_prompt: str = " ", guidance: float | None = None, image_area: int = IMAGE_AREA,
                 condition_area: int = CONDITION_AREA, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(pipe, height, width, max_sequence_length, guidance_scale, negative_prompt, guidance,
                         image_area, compute_dtype)
        self.condition_area = int(condition_area)

    def input_rows(self, prompts: Sequence[str]) -> list[list[Any]]:
        """Each prompt's input images as PIL images, in order: the same number for every prompt."""
        return input_image_sets(prompts, self.FAMILY)

    def condition_image(self, image: Any) -> Any:
        """The pipeline's copy of PIL ``image`` for the text encoder: ``condition_area`` at the image's own ratio."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        width, height = calculate_dimensions(self.condition_area, image.width / image.height)
        return self.pipe.image_processor.resize(image, height, width)

    def encode_text(self, prompts: Sequence[str], shown: Sequence[Sequence[Any]]) -> Tensor:
        """Text states ``[B, max_sequence_length, D]``, one prompt at a time with all of its row's images, as the
        pipeline encodes (it takes one prompt per call)."""
        return torch.cat([self._encode([prompt], row) for prompt, row in zip(prompts, shown)])  # [B, L, D]


QWEN_EDIT_FOLDER = LocalFolder("qwen_image_edit", "Qwen-Image-Edit",
                               "`hf download Qwen/Qwen-Image-Edit --local-dir /models/Qwen-Image-Edit` (several input "
                               "images per prompt: Qwen/Qwen-Image-Edit-2509)", input_images="*",
                               several_images="EditPlus")


@register_policy("qwen_image_edit", QWEN_EDIT_FOLDER)
def build_qwen_image_edit_policy(path: str = "", *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                                 height: int = 1024, width: int = 1024, max_sequence_length: int = 2048,
                                 guidance_scale: float = 1.0, negative_prompt: str = " ", guidance: float | None = None,
                                 image_area: int = IMAGE_AREA,
                                 condition_area: int | None = None) -> QwenImageEditPolicy:
    """Load a local diffusers Qwen-Image-Edit folder offline (``QwenImageEditPipeline``; a 2509 / 2511 folder,
    ``QwenImageEditPlusPipeline`` in its ``model_index.json``, as :class:`QwenImageEditPlusPolicy`), its processor
    built by :func:`image_only_processor`. The options are
    :func:`flowgrove.policies.qwen_image.build_qwen_image_policy`'s (``max_sequence_length`` now counts the input
    images' vision tokens too: about 1400 for one 1024^2 image, about 190 per 384^2 copy), ``image_area``, the pixel
    area of each input image the VAE encodes (the pipelines' 1024^2), and, for a ``QwenImageEditPlusPipeline``
    folder only, ``condition_area``, that of each copy the text encoder reads (None: the pipeline's 384^2).

    Raises:
        ConfigError: ``condition_area`` for a ``QwenImageEditPipeline`` folder (before any weights load).
    """
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    folder = local_folder(path, QWEN_EDIT_FOLDER, dtype)
    plus = QWEN_EDIT_FOLDER.takes_several_images(folder)
    if condition_area is not None and not plus:
        raise ConfigError(f"policy.options.condition_area sizes the text encoder's copies of a "
                          f"QwenImageEditPlusPipeline folder's input images, but {path} holds a "
                          f"{QWEN_EDIT_FOLDER.pipeline_class(folder)}, which reads the VAE's copy: drop the option")
    processor = image_only_processor(folder)
    pipe = load_qwen_pipeline(QwenImageEditPlusPipeline if plus else QwenImageEditPipeline, QWEN_EDIT_FOLDER, path,
                              device, dtype, height, width, components={"processor": processor})
    args = (pipe, height, width, max_sequence_length, guidance_scale, negative_prompt, guidance, image_area)
    if plus:
        area = CONDITION_AREA if condition_area is None else condition_area
        return QwenImageEditPlusPolicy(*args, condition_area=area, compute_dtype=DTYPES[dtype])
    return QwenImageEditPolicy(*args, compute_dtype=DTYPES[dtype])
