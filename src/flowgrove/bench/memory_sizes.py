"""What :mod:`flowgrove.bench.memory` computes with: each shipped family's exact parameter counts and its per-block
activation bytes, from the diffusers configs in ``flowgrove/assets/memory_families.json``.

- Parameters: the transformer (or UNet), VAE and text encoders built on the meta device (no weights, no memory);
  counted per FSDP2 unit (``parallel.engine.shard_units``), in ``nn.Linear`` weights, and per LoRA target name.
- Activations: the transformer at its real width with fewer blocks (the config's ``measure`` keys) built with
  random bfloat16 weights on the CPU runs one forward at two token counts; ``saved_tensors_hooks`` record every
  tensor autograd keeps (parameters excluded, each storage once), attributed to the block that was running, and a
  line ``a + b * tokens`` goes through the two counts per group of blocks and outside them.
- VAE decode: peak live tensor bytes (:class:`LiveBytes`) of one decode at two latent sizes, by output pixels.

Measuring the eight families takes minutes, so ``scripts/memory_sizes.py`` writes the results once into
``flowgrove/assets/memory_sizes.json``, which ``flowgrove memory`` reads (:func:`shipped_sizes`); a test recounts one.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, replace
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowgrove.bench.memory import Line, ModelSizes, UnitSizes
from flowgrove.bench.models import build_random
from flowgrove.parallel.engine import shard_units
from flowgrove.tasks.digits import assets_dir
from flowgrove.training.prepare import float32_masters

FAMILIES_FILE = "memory_families.json"
SIZES_FILE = "memory_sizes.json"
MEASURE_SIDES = (4, 8)  # latent token grid sides of the two measured forwards (16 and 64 image tokens)


def family_configs() -> dict[str, dict]:
    """The shipped families' configs (``memory_families.json``), by family name."""
    data = json.loads((assets_dir() / FAMILIES_FILE).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def text_encoder_configs() -> dict[str, dict]:
    """The text encoders' transformers configs, by name (``memory_families.json``'s ``_text_encoders``)."""
    return json.loads((assets_dir() / FAMILIES_FILE).read_text())["_text_encoders"]


def diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_dims(module: nn.Module) -> dict[str, int]:
    """Sum of in + out features of the ``nn.Linear`` layers each name suffix of 1-3 parts matches (``to_q``,
    ``attn.to_q``, ``to_out.0``): a LoRA of rank r on target t has ``r * lora_dims[t]`` parameters."""
    dims: dict[str, int] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            parts = name.split(".")
            for k in range(1, min(3, len(parts)) + 1):
                key = ".".join(parts[-k:])
                dims[key] = dims.get(key, 0) + layer.in_features + layer.out_features
    return dims


def meta_model(cls_name: str, config: dict) -> nn.Module:
    """``cls(**config)`` on the meta device: shapes only."""
    with torch.device("meta"):
        return diffusers_class(cls_name)(**config)


def text_encoder_params(encoders: list[list[str]]) -> int:
    """Parameters of a family's text encoders (transformers classes on the meta device)."""
    import transformers

    configs, total = text_encoder_configs(), 0
    for cls_name, key in encoders:
        cls = getattr(transformers, cls_name)
        with torch.device("meta"):
            total += count(cls(cls.config_class(**configs[key])))
    return total


# ---- one forward of a transformer: inputs by class, for ``side`` x ``side`` latent tokens and ``text`` tokens ----

def _flux_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    n = side * side
    ids = torch.zeros(n, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n).div(side, rounding_mode="floor").float(), torch.arange(n).remainder(side).float()
    return {"hidden_states": torch.randn(1, n, c["in_channels"], dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text, c["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.randn(1, c["pooled_projection_dim"], dtype=dtype),
            "timestep": torch.tensor([0.5]), "img_ids": ids, "txt_ids": torch.zeros(text, 3),
            "guidance": torch.tensor([3.5]) if c.get("guidance_embeds") else None}


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


def _unet_inputs(c: dict, side: int, text: int, dtype: torch.dtype) -> dict:
    time_dim = 6 * c["addition_time_embed_dim"]
    return {"sample": torch.randn(1, c.get("in_channels", 4), side, side, dtype=dtype), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, text, c["cross_attention_dim"], dtype=dtype),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, c["projection_class_embeddings_input_dim"] - time_dim,
                                                             dtype=dtype),
                                  "time_ids": torch.randn(1, 6, dtype=dtype)}}


INPUTS: dict[str, Callable[[dict, int, int, torch.dtype], dict]] = {
    "FluxTransformer2DModel": _flux_inputs, "SD3Transformer2DModel": _sd3_inputs,
    "QwenImageTransformer2DModel": _qwen_inputs, "WanTransformer3DModel": _wan_inputs,
    "HunyuanVideoTransformer3DModel": _hunyuan_inputs, "UNet2DConditionModel": _unet_inputs,
}
JOINT_TEXT = {"FluxTransformer2DModel", "SD3Transformer2DModel", "QwenImageTransformer2DModel",
              "HunyuanVideoTransformer3DModel"}  # text tokens run through the blocks with the image's


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_by_unit(model: nn.Module, inputs: dict) -> tuple[dict[int, int], dict[int, int], int]:
    """One forward of ``model``: bytes autograd keeps by FSDP2 unit (index in ``shard_units``) and outside them
    (parameters excluded, each storage once), and each unit's hidden-state input bytes (float tensors of rank >= 3)."""
    units = shard_units(model)
    skip = {_storage_key(p) for p in model.parameters()}
    active: list[int] = []
    saved: dict[int, tuple[int, int]] = {}  # storage -> (unit or -1, bytes)
    inputs_of: dict[int, int] = {}

    def enter(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            hidden = {_storage_key(t): t.untyped_storage().nbytes() for t in leaves
                      if t.is_floating_point() and t.dim() >= 3}
            inputs_of[i] = sum(hidden.values())
            active.append(i)
        return hook

    def leave(*_: object) -> None:
        active.pop()

    handles = [u.register_forward_pre_hook(enter(i), with_kwargs=True) for i, u in enumerate(units)]
    handles += [u.register_forward_hook(leave) for u in units]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and key not in saved:
            saved[key] = (active[-1] if active else -1, t.untyped_storage().nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
        del out
    finally:
        for h in handles:
            h.remove()
    by_unit = {i: 0 for i in range(len(units))}
    outside = 0
    for unit, nbytes in saved.values():
        if unit < 0:
            outside += nbytes
        else:
            by_unit[unit] += nbytes
    return by_unit, inputs_of, outside


def line(x0: float, y0: float, x1: float, y1: float) -> Line:
    """The line through two measured points."""
    b = (y1 - y0) / (x1 - x0)
    return Line(y0 - b * x0, b)


def measured_lines(model: nn.Module, cls_name: str, config: dict, text: int, dtype: torch.dtype,
                   sides: tuple[int, int] = MEASURE_SIDES) -> tuple[list[tuple[Line, Line]], Line]:
    """Per unit of ``model`` (saved, inputs) lines and the outside's line, in tokens, from forwards at ``sides``
    under autocast to ``dtype`` (as the policies run them)."""
    joint = text if cls_name in JOINT_TEXT else 0
    points = []
    for side in sides:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=dtype):
            points.append((side * side + joint, *saved_by_unit(model, INPUTS[cls_name](config, side, text, dtype))))
    (n0, s0, i0, o0), (n1, s1, i1, o1) = points
    units = [(line(n0, s0[u], n1, s1[u]), line(n0, i0.get(u, 0), n1, i1.get(u, 0))) for u in s0]
    return units, line(n0, o0, n1, o1)


def group_names(model: nn.Module) -> list[str]:
    """The top-level ``nn.ModuleList`` name of each FSDP2 unit, in ``shard_units`` order."""
    return [name for name, child in model.named_children() if isinstance(child, nn.ModuleList) for _ in child]


def mean_line(lines: list[Line]) -> Line:
    return Line(sum(x.a for x in lines) / len(lines), sum(x.b for x in lines) / len(lines))


def by_group(model: nn.Module, lines: list) -> dict[str, list]:
    """``lines`` (one per FSDP2 unit of ``model``) grouped by the unit's ModuleList."""
    groups: dict[str, list] = {}
    for name, fits in zip(group_names(model), lines):
        groups.setdefault(name, []).append(fits)
    return groups


def add_lora(model: nn.Module, rank: int = 4) -> None:
    """Freeze ``model`` and add peft LoRA adapters on the default targets (``policy.lora_targets``' default)."""
    from peft import LoraConfig

    from flowgrove.config.schema import PolicyConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PolicyConfig().lora_targets),
                                 init_lora_weights="gaussian"))


def transformer_sizes(cls_name: str, config: dict, measure: dict, text: int,
                      dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, list[UnitSizes], Line, Line]:
    """The full model on the meta device, its units with the mean measured lines of their group (measured at the
    real width with the ``measure`` config keys, e.g. one block per group: all weights trained, then a float32
    LoRA on the default targets over the frozen weights), and the outside's line of each of the two."""
    full = meta_model(cls_name, config)
    small = build_random(diffusers_class(cls_name), {**config, **measure}, torch.device("cpu"), dtype)
    trained, outside = measured_lines(small.requires_grad_(True).train(), cls_name, config, text, dtype)
    add_lora(small)
    float32_masters(small)  # as training/prepare.py: float32 adapters (peft casts their inputs to float32)
    lora, outside_lora = measured_lines(small, cls_name, config, text, dtype)
    full_groups, lora_groups = by_group(small, trained), by_group(small, lora)
    units = []
    for name, unit in zip(group_names(full), shard_units(full)):
        units.append(UnitSizes(name, count(unit), mean_line([f[0] for f in full_groups[name]]),
                               mean_line([f[0] for f in lora_groups[name]]),
                               mean_line([f[1] for f in full_groups[name]])))
    return full, units, outside, outside_lora


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that ops create and that are still alive, and their peak (the CPU has no allocator
    counters): each output storage counted once while any tensor made by an op holds it. Tensors made before the
    mode (parameters, inputs) are not counted, nor what ops write in place into the storages ``skip`` names."""

    def __init__(self, skip: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self._skip = skip
        self.live = 0
        self.peak = 0
        self._holders: dict[int, list[int]] = {}  # storage -> [tensors holding it, bytes]

    def _release(self, key: int) -> None:
        entry = self._holders.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._holders[key]

    def _hold(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key == 0 or key in self._skip:
            return
        entry = self._holders.get(key)
        if entry is None:
            entry = self._holders[key] = [0, t.untyped_storage().nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._hold(t)
        return out


def vae_decode_line(cls_name: str, config: dict, dtype: torch.dtype = torch.bfloat16,
                    sides: tuple[int, int] = (4, 8)) -> Line:
    """Peak live bytes of one sample's VAE decode (weights excluded) by output pixels, from two latent sizes (one
    latent frame for the video-shaped VAEs: Wan's, HunyuanVideo's and Qwen-Image's)."""
    video = cls_name != "AutoencoderKL"
    vae = build_random(diffusers_class(cls_name), config, torch.device("cpu"), dtype)
    channels = vae.config.latent_channels if hasattr(vae.config, "latent_channels") else vae.config.z_dim
    points = []
    for side in sides:
        z = torch.randn(1, channels, *((1,) if video else ()), side, side, dtype=dtype)
        with torch.no_grad(), LiveBytes() as live:
            image = vae.decode(z).sample
        points.append((image.shape[-1] * image.shape[-2] * (image.shape[2] if video else 1), live.peak))
    return line(*points[0], *points[1])


def model_sizes(name: str, cls_name: str, config: dict, measure: dict, text: int, patch: int,
                frames_per_token: int = 0) -> ModelSizes:
    """The transformer's counts and measured lines (``measure``: the config keys of the measured model, ``text``: its
    text tokens); no VAE, text encoders or decode (zero)."""
    full, units, outside, outside_lora = transformer_sizes(cls_name, config, measure, text)
    linear = sum(m.weight.numel() for m in full.modules() if isinstance(m, nn.Linear))
    return ModelSizes(name=name, params=count(full), linear_weights=linear, units=tuple(units), outside=outside,
                      outside_lora=outside_lora, lora_dims=lora_dims(full), text_encoder_params=0, vae_params=0,
                      decode=Line(0.0, 0.0), patch=patch, frames_per_token=frames_per_token,
                      joint_text=cls_name in JOINT_TEXT)


def family_sizes(name: str, family: dict) -> ModelSizes:
    """Count and measure the family ``name`` (an entry of :func:`family_configs`); takes a minute or more."""
    cls_name, config = family["transformer"]
    text = 64 if cls_name in JOINT_TEXT else family["text_tokens"] + family.get("text_fixed", 0)
    sizes = model_sizes(name, cls_name, config, family["measure"], text, family["patch"], 4 if family["video"] else 0)
    vae_cls, vae_config = family["vae"]
    return replace(sizes, text_encoder_params=text_encoder_params(family["text_encoders"]),
                   vae_params=count(meta_model(vae_cls, vae_config)), decode=vae_decode_line(vae_cls, vae_config))


def sizes_to_json(sizes: ModelSizes) -> dict:
    return asdict(sizes)


def sizes_from_json(data: dict) -> ModelSizes:
    units = tuple(UnitSizes(u["group"], u["params"], Line(**u["saved"]), Line(**u["saved_lora"]), Line(**u["inputs"]))
                  for u in data["units"])
    lines = {k: Line(**data[k]) for k in ("outside", "outside_lora", "decode")}
    return ModelSizes(**{**data, "units": units, **lines})


def shipped_sizes() -> dict[str, ModelSizes]:
    """Every shipped family's sizes as ``scripts/memory_sizes.py`` wrote them (``memory_sizes.json``)."""
    data = json.loads((assets_dir() / SIZES_FILE).read_text())
    return {name: sizes_from_json(d) for name, d in data.items() if not name.startswith("_")}


def reward_model_params(model: str) -> int:
    """Parameters of a reward's CLIP model (``clip-h``: open_clip ViT-H-14 of HPS-v2.1 and PickScore; ``clip-l``:
    OpenAI's ViT-L/14 of the aesthetic and CLIP scores) on the meta device."""
    from transformers import CLIPConfig, CLIPModel

    from flowgrove.rewards.clip_convert import vit_h14_config

    config = vit_h14_config() if model == "clip-h" else CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                       "num_hidden_layers": 24, "patch_size": 14, "image_size": 224}, projection_dim=768)
    with torch.device("meta"):
        return count(CLIPModel(config))
