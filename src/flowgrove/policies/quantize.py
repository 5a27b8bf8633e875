"""A quantised frozen base for LoRA (``policy.quantize``): the linear weights of a policy's transformer blocks stored
in 8 or 4 bits by a kept library, while the LoRA adapters beside them stay float32 masters.

``int8`` and ``float8`` are torchao's weight-only configs (``quantize_`` with ``Int8WeightOnlyConfig`` /
``Float8WeightOnlyConfig``: the weight is stored quantised and dequantised inside the matmul), ``nf4`` replaces each
``nn.Linear`` with bitsandbytes' ``Linear4bit`` (QLoRA's 4-bit NormalFloat). Only the layers inside the transformer
blocks (:func:`transformer_blocks`, what FSDP2 shards one by one too) are quantised: they hold nearly all the weights,
and the embedders and output projection around them stay as loaded (their dtype is the one the adapters cast their
inputs to). The same module serves rollouts and training, so the importance ratio of the first update stays 1.

Every family quantises through :func:`quantize_base` on ``policy.module``; no family is named here.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flowgrove.messages import ConfigError


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a policy's module: every element of its top-level ``nn.ModuleList``s (diffusers'
    ``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, a UNet's ``down_blocks`` ...); a module
    without such lists that holds whole models (Wan 2.2's two experts) gives its children's blocks."""
    blocks = [block for child in module.children() if isinstance(child, nn.ModuleList) for block in child]
    return blocks or [block for child in module.children() for block in transformer_blocks(child)]


def _torchao(config_name: str) -> Callable[[nn.Module, torch.dtype], None]:
    def apply(block: nn.Module, compute_dtype: torch.dtype) -> None:
        import torchao.quantization as ao

        ao.quantize_(block, getattr(ao, config_name)())

    return apply


def _nf4(block: nn.Module, compute_dtype: torch.dtype) -> None:
    """Every ``nn.Linear`` below ``block`` replaced by bitsandbytes' ``Linear4bit`` (NF4), quantised on its device."""
    import bitsandbytes as bnb

    for parent in block.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(child.weight.device))  # Params4bit quantises when it moves


@dataclass(frozen=True)
class Quantizer:
    """One ``policy.quantize`` kind: the library that stores it and how one block is quantised in place."""

    library: str  # the import name of the package (checked before any model loads)
    bits: int
    apply: Callable[[nn.Module, torch.dtype], None]  # (block, compute dtype) -> None


QUANTIZERS: dict[str, Quantizer] = {
    "int8": Quantizer("torchao", 8, _torchao("Int8WeightOnlyConfig")),
    "float8": Quantizer("torchao", 8, _torchao("Float8WeightOnlyConfig")),
    "nf4": Quantizer("bitsandbytes", 4, _nf4),
}
QUANTIZE_KINDS = ("none", *QUANTIZERS)
FLOAT8_CAPABILITY = (8, 9)  # torchao's float8 kernels: Ada / Hopper and newer


def check_quantize(kind: str, device: torch.device) -> None:
    """``policy.quantize=kind`` can run on ``device``: its library is installed, and float8 has a GPU that holds
    it; loads no model.

    Raises:
        ConfigError: naming the key and the fix.
    """
    if kind == "none":
        return
    if kind not in QUANTIZERS:
        raise ConfigError(f"policy.quantize={kind!r} is not one of {', '.join(QUANTIZE_KINDS)}")
    library = QUANTIZERS[kind].library
    if importlib.util.find_spec(library) is None:
        raise ConfigError(f"policy.quantize={kind} needs {library}, which is not installed: pip install "
                          f"'flowgrove[quant]' (or {library}), or set policy.quantize=none")
    if kind == "float8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < FLOAT8_CAPABILITY:
        have = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ConfigError(f"policy.quantize=float8 needs a GPU of compute capability 8.9 or newer for torchao's float8 "
                          f"weights, but {device} has {have}; set policy.quantize=int8 (or nf4)")


def quantize_base(module: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Quantise the linear weights of ``module``'s transformer blocks in place as ``policy.quantize=kind`` says
    (``none``: nothing); call it on the frozen base before the LoRA adapters are added.

    Args:
        module: The policy's module (``policy.module``), its weights on their device.
        kind: A key of :data:`QUANTIZERS`, or ``none``.
        compute_dtype: The dtype the layers compute in (the policy's autocast dtype; NF4 dequantises to it).

    Returns:
        How many ``nn.Linear`` layers were quantised.
    """
    if kind == "none":
        return 0
    blocks = transformer_blocks(module)
    count = sum(type(m) is nn.Linear for block in blocks for m in block.modules())
    with warnings.catch_warnings():  # bitsandbytes: its optional CPU kernels package is absent (it falls back)
        warnings.filterwarnings("ignore", module="bitsandbytes")
        for block in blocks:
            QUANTIZERS[kind].apply(block, compute_dtype)
    return count
