"""ImageReward v1.0 as transformers BLIP towers plus its linear MLP head (rewards.md section 3).

``r = (mlp(h_cls) - 0.16717362830052426) / 1.0333394966054072`` where ``h_cls`` is the BLIP text encoder's
``[CLS]`` state with cross-attention to the ViT-L/16 image tokens (ImageReward ``score_gard``). The
``ImageReward.pt`` keys are renamed once (``convert_imagereward``) after transformers' BLIP conversion script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from flowgrove.rewards.base import register_reward, reward_device, score_in_batches
from flowgrove.rewards.clip_family import linear_head
from flowgrove.rewards.preprocess import ImageTransform, preprocess
from flowgrove.rewards.weights import Published, from_pretrained, load_state_dict, weight_file

REWARD_MEAN = 0.16717362830052426  # ImageReward.py: self.mean
REWARD_STD = 1.0333394966054072  # ImageReward.py: self.std
MAX_PROMPT_TOKENS = 35  # ImageReward.score: padding="max_length", max_length=35
WEIGHTS = Published("THUDM/ImageReward", "ImageReward.pt", "weights")
MED_CONFIG = Published("THUDM/ImageReward", "med_config.json", "med_config")
TOKENIZER = Published("google-bert/bert-base-uncased", None, "tokenizer")
# BLIP_Pretrain(vit="large", image_size=224): timm-style ViT-L/16, LayerNorm eps 1e-6, final norm on all tokens.
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)
_VISION = [(r"cls_token", "embeddings.class_embedding"), (r"pos_embed", "embeddings.position_embedding"),
           (r"patch_embed\.proj\.", "embeddings.patch_embedding."), (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
           (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."), (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
           (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
           (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."), (r"norm\.", "post_layernorm.")]


def convert_imagereward(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split ``ImageReward.pt`` into ``{"vision", "text", "head"}`` state dicts with transformers BLIP names.

    Raises:
        ValueError: Keys that belong to none of the three parts.
    """
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, target in _VISION:
                if re.match(pattern, name):
                    parts["vision"][re.sub("^" + pattern, target, name)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            if not key.endswith("position_ids"):  # a buffer
                parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["head"][key.removeprefix("mlp.")] = value
        elif not key.startswith(("blip.vision_proj.", "blip.text_proj.")):  # contrastive projections: unused
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an ImageReward checkpoint; unexpected keys {unknown[:6]}.")
    return parts


def text_config_from_med(med: dict[str, Any], encoder_width: int) -> Any:
    """``BlipTextConfig`` of BLIP's "med" ``BertConfig`` json, with ``encoder_width`` set as ``BLIP_Pretrain`` does."""
    from transformers import BlipTextConfig

    vocab = med["vocab_size"]
    return BlipTextConfig(vocab_size=vocab, hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
                          intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                          num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"],
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                          pad_token_id=med.get("pad_token_id", 0), bos_token_id=min(30522, vocab - 1),
                          sep_token_id=min(102, vocab - 1))


class ImageRewardModel(nn.Module):
    """BLIP image tokens -> text encoder with cross-attention -> ``[CLS]`` -> linear head -> normalised reward."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.vision, self.text, self.head = vision, text, head

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards ``[B]`` for pixels ``[B, 3, 224, 224]`` and tokens ``[B, 35]``."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + P, Dv]
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=pixels.device)  # [B, 1 + P]
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                           encoder_attention_mask=image_mask).last_hidden_state  # [B, L, Dt]
        raw = self.head(hidden[:, 0].float()).squeeze(-1)  # [B]
        return (raw - REWARD_MEAN) / REWARD_STD


def build_imagereward(state_dict: dict[str, Tensor], med: dict[str, Any], vision_config: dict[str, Any]) -> ImageRewardModel:
    """An ``ImageRewardModel`` with ``state_dict`` (``ImageReward.pt`` layout) loaded strictly into each part."""
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    parts = convert_imagereward(state_dict)
    vision = BlipVisionModel(BlipVisionConfig(**vision_config))
    text = BlipTextModel(text_config_from_med(med, vision_config["hidden_size"]), add_pooling_layer=False)
    try:
        vision.load_state_dict(parts["vision"], strict=True)
        text.load_state_dict(parts["text"], strict=True)
    except RuntimeError as error:
        raise ValueError(f"imagereward: the checkpoint does not fit the BLIP configs: {error}") from None
    return ImageRewardModel(vision, text, linear_head(parts["head"])).eval().requires_grad_(False)


class ImageRewardScorer:
    """ImageReward on images in [0, 1]: resize 224 + centre crop (torchvision rounding), BERT tokens, model."""

    def __init__(self, model: ImageRewardModel, tokenizer: Any, transform: ImageTransform, *,
                 device: torch.device, batch_size: int) -> None:
        self.model, self.tokenizer, self.transform = model.to(device), tokenizer, transform
        self.device, self.batch_size = device, batch_size

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[b]`` rewards of images ``[b, 3, H, W]`` on the model's device."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        return self.model(preprocess(images, self.transform), tokens["input_ids"], tokens["attention_mask"])

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return score_in_batches(self.score, images, prompts, batch_size=self.batch_size, device=self.device)


def blip_tokenizer(path: str | Path | None) -> Any:
    """``bert-base-uncased`` plus BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens (``init_tokenizer``)."""
    from transformers import BertTokenizer

    tokenizer = from_pretrained(BertTokenizer.from_pretrained, path, TOKENIZER, "imagereward")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@register_reward("imagereward")
def imagereward(weights: str | Path | None = None, med_config: str | Path | None = None,
                tokenizer: str | Path | None = None, vision_config: dict[str, Any] | None = None,
                device: str | torch.device | None = None, batch_size: int = 16, backend: str = "pil") -> ImageRewardScorer:
    """ImageReward v1.0, the normalised reward (about -2 to 2) Flow-GRPO and MixGRPO use.

    Args:
        weights: ``ImageReward.pt`` (or its folder); None: ``THUDM/ImageReward`` from the HF cache.
        med_config: ``med_config.json`` (or its folder); None: beside ``weights``, else the HF cache.
        tokenizer: A ``bert-base-uncased`` tokenizer folder; None: the HF cache.
        vision_config: ``BlipVisionConfig`` keywords; None: BLIP ViT-L/16 at 224 (``VIT_LARGE``).
        device: Where the model runs (default CUDA when available).
        batch_size: Images per forward pass.
        backend: ``"pil"`` (the reference's pixels) or ``"torch"`` resize.
    """
    weights_path = weight_file(weights, WEIGHTS, "imagereward")
    if med_config is None and (weights_path.parent / MED_CONFIG.filename).is_file():
        med_config = weights_path.parent
    med = json.loads(weight_file(med_config, MED_CONFIG, "imagereward").read_text())
    vision = {**VIT_LARGE, **(vision_config or {})}
    model = build_imagereward(load_state_dict(weights_path, "imagereward"), med, vision)
    transform = ImageTransform("crop", vision["image_size"], backend, "round")  # type: ignore[arg-type]
    return ImageRewardScorer(model, blip_tokenizer(tokenizer), transform, device=reward_device(device),
                             batch_size=batch_size)
