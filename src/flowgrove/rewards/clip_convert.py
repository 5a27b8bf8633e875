"""open_clip ``CLIP`` checkpoints (HPS-v2.1, DFN5B) as transformers ``CLIPModel`` weights (rewards.md section 1.5).

open_clip keeps OpenAI's key layout: fused ``in_proj`` attention (split into q, k, v) and projections stored as
``[width, embed]`` (used as ``x @ P``, so HF's ``Linear.weight`` is ``P.T``). Head counts and the activation are
not in the tensors; they come from the config (``vit_h14_config``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from flowgrove.rewards.weights import Published, from_pretrained, load_state_dict, weight_file

_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")


def open_clip_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename and reshape an open_clip ``CLIP`` state dict (ViT tower, standard text tower) to ``CLIPModel`` keys.

    Raises:
        ValueError: Keys that have no ``CLIPModel`` counterpart (layer scale, attention pooling, HF text towers).
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        block = _RESBLOCK.match(key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()  # [width, embed] -> Linear.weight [embed, width]
        elif key == "attn_mask":
            continue  # the causal mask buffer; CLIPModel builds its own
        elif block is not None:
            tower = "vision_model" if block.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{block.group(2)}."
            name, kind = block.group(3), block.group(4)
            if name == "attn.in_proj":
                for proj, part in zip("qkv", value.chunk(3, dim=0)):  # [3W, ...] -> q, k, v
                    out[f"{prefix}self_attn.{proj}_proj.{kind}"] = part.contiguous()
            elif name in _BLOCK:
                out[f"{prefix}{_BLOCK[name]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a standard open_clip ViT CLIP checkpoint; keys without a CLIPModel counterpart: "
                         f"{unknown[:6]}{' ...' if len(unknown) > 6 else ''}.")
    return out


def vit_h14_config(hidden_act: str = "gelu", image_size: int = 224) -> Any:
    """``CLIPConfig`` of open_clip ViT-H-14 (HPS-v2.1, PickScore, laion H/14; DFN5B-378 with ``quick_gelu``, 378)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                num_hidden_layers=24, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=1024,
                layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                  image_size=image_size, patch_size=14, hidden_act=hidden_act, projection_dim=1024, layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def load_open_clip_model(weights: str | Path | None, config: Any, published: Published, reward: str) -> Any:
    """A ``CLIPModel`` from an open_clip checkpoint (converted, strict load) or from a converted folder.

    Args:
        weights: The checkpoint file (or a folder holding ``published.filename``), a folder written by
            ``CLIPModel.save_pretrained`` (a converted cache), or None for the HF cache.
        config: A ``CLIPConfig``, or a path to one, used for checkpoints; ignored for converted folders.
        published: Where the checkpoint is published.
        reward: The reward's name, for errors.

    Returns:
        The ``CLIPModel`` in eval mode, frozen, float32, on the CPU.
    """
    from transformers import CLIPConfig, CLIPModel

    if weights is not None and (Path(weights).expanduser() / "config.json").is_file():
        model = from_pretrained(CLIPModel.from_pretrained, weights, published, reward)
        return model.eval().requires_grad_(False)
    state = open_clip_to_hf(load_state_dict(weight_file(weights, published, reward), reward))
    if not isinstance(config, CLIPConfig):
        config = CLIPConfig.from_pretrained(str(config))
    model = CLIPModel(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a size mismatch
        raise ValueError(f"{reward}: the checkpoint does not fit the CLIP config: {str(error).splitlines()[-1]}") from None
    missing_keys = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing_keys or result.unexpected_keys:
        raise ValueError(f"{reward}: the checkpoint does not fit the CLIP config (missing {missing_keys[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}); check the config's sizes.")
    return model.eval().requires_grad_(False)
