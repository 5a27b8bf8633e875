"""One forward's inputs of each shipped family's transformer (or UNet), by diffusers class, for ``side`` x ``side``
latent tokens and ``text`` text tokens: random tensors of the model's shapes (batch 1), as its pipeline passes them.
:mod:`flowgrove.bench.memory_sizes` measures activation bytes with them, at the real width and at tiny ones.
"""

from __future__ import annotations

from typing import Callable

import torch


def _flux_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    n = side * side
    ids = torch.zeros(n, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n).div(side, rounding_mode="floor").float(), torch.arange(n).remainder(side).float()
    return {"hidden_states": torch.randn(1, n, c["in_channels"], dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text, c["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.randn(1, c["pooled_projection_dim"], dtype=dtype),
            "timestep": torch.tensor([0.5]), "img_ids": ids, "txt_ids": torch.zeros(text, 3),
            "guidance": torch.tensor([3.5]) if c.get("guidance_embeds") else None}


def _flux2_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    n = side * side
    ids = torch.zeros(n, 4, dtype=torch.long)  # (t, row, col, l) as Flux2Pipeline._prepare_latent_ids
    ids[:, 1], ids[:, 2] = torch.arange(n).div(side, rounding_mode="floor"), torch.arange(n).remainder(side)
    txt_ids = torch.zeros(text, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(text)
    return {"hidden_states": torch.randn(1, n, c.get("in_channels", 128), dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text, c.get("joint_attention_dim", 15360), dtype=dtype),
            "timestep": torch.tensor([0.5]), "img_ids": ids, "txt_ids": txt_ids,
            "guidance": torch.tensor([4.0]) if c.get("guidance_embeds", True) else None}


def _sd3_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    p = c.get("patch_size", 2)
    return {"hidden_states": torch.randn(1, c.get("in_channels", 16), p * side, p * side, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text, c.get("joint_attention_dim", 4096), dtype=dtype),
            "pooled_projections": torch.randn(1, c.get("pooled_projection_dim", 2048), dtype=dtype),
            "timestep": torch.tensor([500.0])}


def _qwen_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    return {"hidden_states": torch.randn(1, side * side, c.get("in_channels", 64), dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text, c.get("joint_attention_dim", 3584), dtype=dtype),
            "encoder_hidden_states_mask": torch.ones(1, text), "timestep": torch.tensor([0.5]),
            "img_shapes": [[(1, side, side)]]}


def _wan_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    p = c.get("patch_size", (1, 2, 2))[-1]
    return {"hidden_states": torch.randn(1, c.get("in_channels", 16), 1, p * side, p * side, dtype=dtype),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, text, c.get("text_dim", 4096), dtype=dtype)}


def _hunyuan_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    p = c.get("patch_size", 2)
    return {"hidden_states": torch.randn(1, c.get("in_channels", 16), 1, p * side, p * side, dtype=dtype),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, text, c.get("text_embed_dim", 4096), dtype=dtype),
            "encoder_attention_mask": torch.ones(1, text), "guidance": torch.tensor([6000.0]),
            "pooled_projections": torch.randn(1, c.get("pooled_projection_dim", 768), dtype=dtype)}


def _z_image_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    p = c.get("all_patch_size", (2,))[0]
    return {"x": [torch.randn(c.get("in_channels", 16), 1, p * side, p * side, dtype=dtype)],  # one [C, F, H, W]
            "t": torch.tensor([0.5]), "cap_feats": [torch.randn(text, c.get("cap_feat_dim", 2560), dtype=dtype)]}


def _unet_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    time_dim = 6 * c["addition_time_embed_dim"]
    return {"sample": torch.randn(1, c.get("in_channels", 4), side, side, dtype=dtype), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, text, c["cross_attention_dim"], dtype=dtype),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, c["projection_class_embeddings_input_dim"] - time_dim,
                                                             dtype=dtype),
                                  "time_ids": torch.randn(1, 6, dtype=dtype)}}


INPUTS: dict[str, Callable[[dict, int, int, torch.dtype], dict]] = {
    "FluxTransformer2DModel": _flux_inputs, "Flux2Transformer2DModel": _flux2_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
    "QwenImageTransformer2DModel": _qwen_inputs, "WanTransformer3DModel": _wan_inputs,
    "HunyuanVideoTransformer3DModel": _hunyuan_inputs, "UNet2DConditionModel": _unet_inputs,
    "ZImageTransformer2DModel": _z_image_inputs,
}
JOINT_TEXT = {"FluxTransformer2DModel", "Flux2Transformer2DModel", "SD3Transformer2DModel",
              "QwenImageTransformer2DModel", "HunyuanVideoTransformer3DModel",
              "ZImageTransformer2DModel"}  # text tokens run through the blocks with the image's
