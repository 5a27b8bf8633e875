"""The reference packages' own model code, imported without torchvision, timm or fairscale (test helpers).

* open_clip_torch 3.3.0 (``pip install --no-deps open_clip_torch==3.3.0``): ``open_clip.model.CLIP`` and its
  ``SimpleTokenizer``. Its ``__init__`` imports torchvision, so the package module is replaced by a bare one
  whose ``__path__`` is the installed folder; ``utils.py`` needs ``torchvision.ops.misc.FrozenBatchNorm2d``
  (ResNet freezing only), stubbed while the modules import.
* image-reward 1.5 (``pip install --no-deps image-reward==1.5``): BLIP's ``vit.py`` and ``med.py`` and the
  ``ImageReward`` class itself (its ``score_gard`` is the reference formula). timm's ``PatchEmbed`` is
  re-stated from timm 0.6.13; ``med.py``'s imports of helpers that transformers 5 moved or removed are
  redirected to ``transformers.pytorch_utils``, ``init_weights()`` becomes v5's ``post_init()``, and the
  ``PreTrainedModel`` plumbing that v5 dropped (``invert_attention_mask``, ``get_head_mask``) is restored
  with the v4 definitions. No formula is changed.
* HPSv2's ``ResizeMaxSize`` (hpsv2x 1.2.0 ``src/open_clip/transform.py``) is copied below; torchvision's
  tensor ``F.resize`` inside it is its tensor path, ``interpolate(bicubic, antialias=True)`` without clamping.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

INSTALL_HINT = "pip install --no-deps open_clip_torch==3.3.0 image-reward==1.5 (make test does)"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds without importing the package's __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"reference package {name} not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _bare_package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    return module


def _stub(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _prepare_transformers() -> None:
    # Import (and cache the torchvision probe of) transformers before any stub exists.
    import transformers.modeling_outputs  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers.utils import is_torchvision_available

    is_torchvision_available()


def open_clip_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``(open_clip.model, open_clip.tokenizer)`` from open_clip_torch, with no torchvision."""
    root = _package_dir("open_clip")
    pytest.importorskip("ftfy", reason="open_clip's tokenizer needs ftfy")
    _prepare_transformers()
    misc = _stub("torchvision.ops.misc", FrozenBatchNorm2d=nn.BatchNorm2d)
    stubs = {"open_clip": _bare_package("open_clip", root), "torchvision": _stub("torchvision"),
             "torchvision.ops": _stub("torchvision.ops", misc=misc), "torchvision.ops.misc": misc}
    with mock.patch.dict(sys.modules, stubs):
        return importlib.import_module("open_clip.model"), importlib.import_module("open_clip.tokenizer")


class ResizeMaxSize(nn.Module):
    """Copied from hpsv2x 1.2.0 ``hpsv2/src/open_clip/transform.py`` (tensor branch; ``F.resize`` inlined)."""

    def __init__(self, max_size: int, fill: float = 0) -> None:
        super().__init__()
        self.max_size = max_size
        self.fill = fill

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = F.interpolate(img[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)[0]
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = F.pad(img, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=self.fill)
        return img


class PatchEmbed(nn.Module):
    """timm 0.6.13 ``PatchEmbed`` (image to patch tokens; ``norm_layer`` None), as BLIP's ``vit.py`` uses it."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


def _invert_attention_mask(self, mask):  # transformers 4.x ModuleUtilsMixin.invert_attention_mask
    extended = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):  # transformers 4.x
    return [None] * num_hidden_layers if head_mask is None else head_mask


def _exec_module(name: str, path: Path, replace: dict[str, str]) -> types.ModuleType:
    source = path.read_text()
    for old, new in replace.items():
        assert old in source, f"{path.name} changed: {old!r} not found"
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__package__ = name.rpartition(".")[0]
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def image_reward_modules() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """``(vit, med, ImageReward)`` modules of image-reward 1.5, importable without torchvision, timm, fairscale."""
    root = _package_dir("ImageReward")
    _prepare_transformers()
    identity = lambda *args, **kwargs: (lambda x: x)  # noqa: E731  (torchvision transform stand-ins, unused)
    stubs = {
        "ImageReward": _bare_package("ImageReward", root),
        "ImageReward.models": _bare_package("ImageReward.models", root / "models"),
        "ImageReward.models.BLIP": _bare_package("ImageReward.models.BLIP", root / "models" / "BLIP"),
        "timm": _stub("timm"), "timm.models": _stub("timm.models"),
        "timm.models.vision_transformer": _stub("tvt", _cfg=dict, PatchEmbed=PatchEmbed),
        "timm.models.registry": _stub("tr", register_model=lambda f: f),
        "timm.models.layers": _stub("tl", trunc_normal_=nn.init.trunc_normal_, DropPath=lambda p: nn.Identity()),
        "timm.models.helpers": _stub("th", named_apply=None, adapt_input_conv=None),
        "timm.models.hub": _stub("thub", download_cached_file=None),
        "fairscale": _stub("fairscale"), "fairscale.nn": _stub("fairscale.nn"),
        "fairscale.nn.checkpoint": _stub("fc"),
        "fairscale.nn.checkpoint.checkpoint_activations": _stub("fca", checkpoint_wrapper=lambda m, **k: m),
        "torchvision": _stub("torchvision"),
        "torchvision.transforms": _stub("torchvision.transforms", Compose=identity, Resize=identity,
                                        CenterCrop=identity, ToTensor=identity, Normalize=identity),
        "ImageReward.models.BLIP.blip_pretrain": _stub("bp", BLIP_Pretrain=None),
    }
    blip = root / "models" / "BLIP"
    with mock.patch.dict(sys.modules, stubs):
        vit = _exec_module("ImageReward.models.BLIP.vit", blip / "vit.py", {})
        med = _exec_module("ImageReward.models.BLIP.med", blip / "med.py", {
            "    apply_chunking_to_forward,\n    find_pruneable_heads_and_indices,\n    prune_linear_layer,\n": "",
            "from transformers.utils import logging":
                "from transformers.utils import logging\n"
                "from transformers.pytorch_utils import apply_chunking_to_forward, prune_linear_layer\n"
                "find_pruneable_heads_and_indices = None",
            "self.init_weights()": "self.post_init()"})  # v5 sets up weight tying in post_init
        image_reward = _exec_module("ImageReward.ImageReward", root / "ImageReward.py", {})
    for name, fn in (("invert_attention_mask", _invert_attention_mask), ("get_head_mask", _get_head_mask)):
        if not hasattr(med.BertModel, name):
            setattr(med.BertModel, name, fn)
    return vit, med, image_reward
