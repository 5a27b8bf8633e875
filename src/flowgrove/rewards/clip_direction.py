"""``clip_direction``: CLIP directional similarity of an edit, for the editing models (docs/editing.md).

The score of an output image is the cosine between the change in CLIP image space from the prompt row's input image
to the output and the change in CLIP text space from the input's caption to the output's (InstructPix2Pix's
"CLIP text-image direction similarity", after StyleGAN-NADA):

    cos(normalize(E_img(output)) - normalize(E_img(input)), normalize(E_txt(after)) - normalize(E_txt(before)))

``before`` is the row's ``input_caption`` metadata (default: the empty text) and ``after`` its ``output_caption``
(default: the prompt itself, the edit instruction). The input image is the row's ``prompt.metadata["image"]``
(``training/prompts.py``): the reward opens each one once and keeps its CLIP embedding (one file read per prompt
over a run, the only I/O), so a step costs one image forward per output. In [-1, 1]; an output equal to its input
scores 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowgrove.rewards.base import register_reward, reward_device, score_in_batches
from flowgrove.rewards.clip_family import COSINE, Run, TextImageScorer, openai_clip


def direction_cosine(image_from: Tensor, image_to: Tensor, text_from: Tensor, text_to: Tensor) -> Tensor:
    """Row-wise cosine ``[B]`` between the image direction ``n(image_to) - n(image_from)`` and the text direction
    ``n(text_to) - n(text_from)`` (``n``: L2 normalisation; every input ``[B, D]``); 0 where a direction is 0."""
    image_dir = F.normalize(image_to.float(), dim=-1) - F.normalize(image_from.float(), dim=-1)  # [B, D]
    text_dir = F.normalize(text_to.float(), dim=-1) - F.normalize(text_from.float(), dim=-1)  # [B, D]
    return (F.normalize(image_dir, dim=-1) * F.normalize(text_dir, dim=-1)).sum(-1)  # [B]


def read_image(path: str) -> Tensor:
    """An RGB image file as ``[1, 3, H, W]`` float in [0, 1] (uint8 levels)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W]


class DirectionScorer(TextImageScorer):
    """:func:`direction_cosine` of a CLIP model's embeddings; input-image embeddings are kept per path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: dict[str, Tensor] = {}  # input image path -> its CLIP embedding [D]

    def input_features(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings ``[b, D]`` of the prompts' input images (``metadata["image"]``), each computed once."""
        rows = []
        for prompt in prompts:
            path = getattr(prompt, "metadata", {}).get("image")
            if not path:
                raise ValueError(f"clip_direction compares an edit with its input image: prompt {str(prompt)!r} has "
                                 'none; give data.train rows an "image" (jsonl) or an image column (csv)')
            if path not in self.inputs:
                self.inputs[path] = self.image_features(read_image(path))[0]  # [D]
            rows.append(self.inputs[path])
        return torch.stack(rows)  # [b, D]

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[b]`` direction scores of the edits ``images`` ``[b, 3, H, W]`` of the prompts' input images."""
        meta = [getattr(p, "metadata", {}) for p in prompts]
        before = self.text_features([m.get("input_caption", "") for m in meta])  # [b, D]
        after = self.text_features([m.get("output_caption", str(p)) for m, p in zip(meta, prompts)])  # [b, D]
        return direction_cosine(self.input_features(prompts), self.image_features(images), before, after)  # [b]

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return score_in_batches(self.score, images, prompts, batch_size=self.run.batch_size, device=self.device,
                                autocast=self.run.autocast)


@register_reward("clip_direction")
def clip_direction(weights: str | Path | None = None, processor: str | Path | None = None,
                   device: str | torch.device | None = None, batch_size: int = 16, autocast: bool = False,
                   backend: str = "pil") -> DirectionScorer:
    """CLIP directional similarity of an edit: input image to output vs input caption to prompt, in [-1, 1].

    Args:
        weights: A ``CLIPModel`` folder; None: ``openai/clip-vit-large-patch14`` from the HF cache.
        processor: A ``CLIPProcessor`` folder; None: the one beside ``weights``.
        device: Where the model runs (default CUDA when available).
        batch_size: Images per forward pass.
        autocast: fp16 autocast on CUDA.
        backend: ``"pil"`` or ``"torch"`` resize (see ``pickscore``).
    """
    return DirectionScorer(*openai_clip(weights, processor, backend, "clip_direction"), COSINE, clean_text=False,
                           run=Run(reward_device(device), batch_size, autocast))
