"""What :mod:`flowgrove.bench.memory` computes with: each shipped family's exact parameter counts and its per-block
activation bytes, from the diffusers configs in ``flowgrove/assets/memory_families.json``.

- Parameters: the transformer (or UNet), VAE and text encoders built on the meta device (no weights, no memory);
  counted per FSDP2 unit (``parallel.engine.shard_units``), in ``nn.Linear`` weights, and per LoRA target name.
- Activations: the transformer at its real width with fewer blocks (the config's ``measure`` keys) built with
  random bfloat16 weights on the CPU runs one forward at two token counts; ``saved_tensors_hooks`` record every
  tensor autograd keeps (parameters excluded, each storage once), attributed to the block that was running, and a
  line ``a + b * tokens`` goes through the two counts per group of blocks and outside them.
- VAE decode: peak live tensor bytes (:class:`LiveBytes`) of one decode at two latent sizes, by output pixels.

Measuring the shipped families takes minutes, so ``scripts/memory_sizes.py`` writes the results once into
``flowgrove/assets/memory_sizes.json``, which ``flowgrove memory`` reads (:func:`shipped_sizes`); a test recounts one.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowgrove.bench.memory import Line, ModelSizes, UnitSizes
from flowgrove.bench.memory_inputs import INPUTS, JOINT_TEXT
from flowgrove.bench.models import build_random
from flowgrove.parallel.engine import shard_units
from flowgrove.tasks.digits import assets_dir
from flowgrove.training.prepare import float32_masters

FAMILIES_FILE = "memory_families.json"
SIZES_FILE = "memory_sizes.json"
IMAGE_VAES = ("AutoencoderKL", "AutoencoderKLFlux2")  # decode [B, C, h, w]; the others one latent frame [B, C, 1, h, w]
MEASURE_SIDES = (4, 8)  # latent token grid sides of the two measured forwards (16 and 64 image tokens)


def family_configs() -> dict[str, dict]:
    """The shipped families' configs (``memory_families.json``), by family name."""
    data = json.loads((assets_dir() / FAMILIES_FILE).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def text_encoder_configs() -> dict[str, dict]:
    """The text encoders' transformers configs, by name (``memory_families.json``'s ``_text_encoders``)."""
    return json.loads((assets_dir() / FAMILIES_FILE).read_text())["_text_encoders"]


def diffusers_class(name: str) -> type:
    """The diffusers class ``name`` (``FluxTransformer2DModel``, ``AutoencoderKL`` ...)."""
    import diffusers

    return getattr(diffusers, name)


def count(module: nn.Module) -> int:
    """Parameters of ``module`` (works on the meta device)."""
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


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True)
class SavedBytes:
    """What one forward kept for backward, by FSDP2 unit (index in ``shard_units``) and outside them."""

    units: dict[int, int]  # bytes autograd keeps while the unit runs
    inputs: dict[int, int]  # bytes of the unit's hidden-state inputs (float tensors of rank >= 3)
    outside: int


@dataclass(frozen=True)
class UnitLines:
    """One unit's measured lines in tokens: what it saves, and its hidden-state inputs."""

    saved: Line
    inputs: Line


@dataclass(frozen=True)
class MeasuredLines:
    """Every unit's lines and the outside's, from forwards at two token counts."""

    units: list[UnitLines]
    outside: Line


@dataclass(frozen=True)
class TransformerSizes:
    """The full model on the meta device, its units' sizes, and the outside's line when trained whole / under LoRA."""

    model: nn.Module
    units: list[UnitSizes]
    outside: Line
    outside_lora: Line


def saved_by_unit(model: nn.Module, inputs: dict) -> SavedBytes:
    """One forward of ``model``: bytes autograd keeps by FSDP2 unit and outside them (parameters excluded, each
    storage once, attributed to the unit running when it was saved), and each unit's hidden-state input bytes."""
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
    by_unit = {i: sum(n for u, n in saved.values() if u == i) for i in range(len(units))}
    return SavedBytes(by_unit, inputs_of, sum(n for u, n in saved.values() if u < 0))


def line(x0: float, y0: float, x1: float, y1: float) -> Line:
    """The line through two measured points."""
    b = (y1 - y0) / (x1 - x0)
    return Line(y0 - b * x0, b)


def measured_lines(model: nn.Module, cls_name: str, config: dict, text: int, dtype: torch.dtype,
                   sides: tuple[int, int] = MEASURE_SIDES) -> MeasuredLines:
    """Every unit's lines and the outside's, in tokens, from forwards of ``model`` at ``sides`` x ``sides`` latent
    tokens and ``text`` text tokens under autocast to ``dtype`` (as the policies run them)."""
    joint = text if cls_name in JOINT_TEXT else 0
    (n0, n1), points = [side * side + joint for side in sides], []
    for side in sides:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=dtype):
            points.append(saved_by_unit(model, INPUTS[cls_name](config, side, text, dtype)))
    p0, p1 = points
    units = [UnitLines(line(n0, p0.units[u], n1, p1.units[u]),
                       line(n0, p0.inputs.get(u, 0), n1, p1.inputs.get(u, 0))) for u in p0.units]
    return MeasuredLines(units, line(n0, p0.outside, n1, p1.outside))


def group_names(model: nn.Module) -> list[str]:
    """The top-level ``nn.ModuleList`` name of each FSDP2 unit, in ``shard_units`` order."""
    return [name for name, child in model.named_children() if isinstance(child, nn.ModuleList) for _ in child]


def mean_line(lines: list[Line]) -> Line:
    """The mean of ``lines`` (the measured blocks of one group stand for all of the full model's)."""
    return Line(sum(x.a for x in lines) / len(lines), sum(x.b for x in lines) / len(lines))


def group_means(model: nn.Module, lines: MeasuredLines) -> dict[str, UnitLines]:
    """The mean lines of each group of ``model``'s units (a ModuleList: ``transformer_blocks``, ...)."""
    groups: dict[str, list[UnitLines]] = {}
    for name, unit in zip(group_names(model), lines.units):
        groups.setdefault(name, []).append(unit)
    return {name: UnitLines(mean_line([u.saved for u in units]), mean_line([u.inputs for u in units]))
            for name, units in groups.items()}


def add_lora(model: nn.Module, rank: int = 4) -> None:
    """Freeze ``model`` and add peft LoRA adapters on the default targets (``policy.lora_targets``' default)."""
    from peft import LoraConfig

    from flowgrove.config.schema import PolicyConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PolicyConfig().lora_targets),
                                 init_lora_weights="gaussian"))


def transformer_sizes(cls_name: str, config: dict, measure: dict, text: int,
                      dtype: torch.dtype = torch.bfloat16) -> TransformerSizes:
    """The full model on the meta device and its units with the mean measured lines of their group, measured at the
    real width with the ``measure`` config keys (e.g. one block per group): all weights trained, then a float32
    LoRA on the default targets over the frozen weights."""
    full = meta_model(cls_name, config)
    small = build_random(diffusers_class(cls_name), {**config, **measure}, torch.device("cpu"), dtype)
    trained = measured_lines(small.requires_grad_(True).train(), cls_name, config, text, dtype)
    add_lora(small)
    float32_masters(small)  # as training/prepare.py: float32 adapters (peft casts their inputs to float32)
    lora = measured_lines(small, cls_name, config, text, dtype)
    trained_groups, lora_groups = group_means(small, trained), group_means(small, lora)
    units = [UnitSizes(name, count(unit), trained_groups[name].saved, lora_groups[name].saved,
                       trained_groups[name].inputs) for name, unit in zip(group_names(full), shard_units(full))]
    return TransformerSizes(full, units, trained.outside, lora.outside)


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
    latent frame for the video-shaped VAEs: Wan's, HunyuanVideo's and Qwen-Image's; FLUX.1's, SD's and FLUX.2's decode
    images)."""
    video = cls_name not in IMAGE_VAES
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
    t = transformer_sizes(cls_name, config, measure, text)
    linear = sum(m.weight.numel() for m in t.model.modules() if isinstance(m, nn.Linear))
    return ModelSizes(name=name, params=count(t.model), linear_weights=linear, units=tuple(t.units), outside=t.outside,
                      outside_lora=t.outside_lora, lora_dims=lora_dims(t.model), text_encoder_params=0, vae_params=0,
                      decode=Line(0.0, 0.0), patch=patch, frames_per_token=frames_per_token,
                      joint_text=cls_name in JOINT_TEXT)


def family_sizes(name: str, family: dict) -> ModelSizes:
    """Count and measure the family ``name`` (an entry of :func:`family_configs`); takes a minute or more."""
    cls_name, config = family["transformer"]
    text = 64 if cls_name in JOINT_TEXT else family["text_tokens"] + family.get("text_fixed", 0)
    sizes = model_sizes(name, cls_name, config, family["measure"], text, family["patch"], 4 if family["video"] else 0)
    vae_cls, vae_config = family["vae"]
    return replace(sizes, text_encoder_params=text_encoder_params(family["text_encoders"]),
                   vae_params=count(meta_model(vae_cls, vae_config)), decode=vae_decode_line(vae_cls, vae_config),
                   image_tokens=family.get("image_tokens", 0), experts=family.get("experts", 1))


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
