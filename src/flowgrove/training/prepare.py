"""From ``policy.*`` settings to a policy ready for training: adapter options, the quantised frozen base
(``policy.quantize``), LoRA, float32 master weights and gradient checkpointing. Family-agnostic: everything here goes through the policy protocol and ``policy.module``.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from flowgrove.config.load import Config
from flowgrove.policies.base import FlowPolicy, build_policy, policy_factory
from flowgrove.policies.pipelines import DTYPES
from flowgrove.policies.quantize import quantize_base


_OWN_KEYS = ("device", "dtype", "path", "weights")  # factory arguments set by their own policy.* keys


def check_policy_options(cfg: Config) -> None:
    """An option of ``policy.options`` that the factory does not take is an error that names
    ``policy.options.<key>`` and the options it takes. Loads nothing."""
    p = cfg.policy
    params = inspect.signature(policy_factory(p.name)).parameters
    for key in p.options:
        if key not in params or key in _OWN_KEYS:
            allowed = sorted(k for k in params if k not in _OWN_KEYS)
            raise ValueError(f"policy.options.{key} is not a setting of policy {p.name!r}; it takes: "
                             f"{', '.join(allowed) or 'none'} (device, dtype and path have their own keys)")


def policy_kwargs(cfg: Config, device: torch.device) -> dict:
    """Keyword arguments of the policy factory: device, path, dtype and ``policy.options`` (checked)."""
    check_policy_options(cfg)
    p = cfg.policy
    return {"device": device, "dtype": p.dtype, **({"path": p.path} if p.path else {}), **p.options}


def apply_lora(policy: FlowPolicy, cfg: Config) -> None:
    """Freeze the transformer and add peft LoRA adapters to ``policy.lora_targets`` (rank 0: full fine-tune)."""
    p = cfg.policy
    if p.lora_rank <= 0:
        return
    from peft import LoraConfig

    policy.module.requires_grad_(False)
    alpha = p.lora_alpha or 2 * p.lora_rank
    with warnings.catch_warnings():  # peft over torchao weights: merge() needs transformers' TorchAoConfig; unused
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        policy.module.add_adapter(LoraConfig(r=p.lora_rank, lora_alpha=alpha, target_modules=list(p.lora_targets),
                                             init_lora_weights="gaussian"))


def float32_masters(module: torch.nn.Module) -> int:
    """Cast every trainable parameter to float32 (frozen ones keep their dtype, e.g. a bf16 base under LoRA), so
    that AdamW's updates and state are float32. Returns how many parameters were cast."""
    cast = 0
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                cast += 1
    return cast


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """The diffusers transformer's own switch (``ModelMixin.enable_gradient_checkpointing``)."""
    switch = getattr(module, "enable_gradient_checkpointing", None)
    if switch is None:
        raise ValueError(f"train.gradient_checkpointing=true, but {type(module).__name__} has no "
                         "enable_gradient_checkpointing(); set train.gradient_checkpointing=false")
    switch()


def prepare_policy(cfg: Config, device: torch.device) -> FlowPolicy:
    """Build ``policy.name`` and make it trainable as configured (the quantised frozen base, LoRA, float32 masters,
    checkpointing)."""
    policy = build_policy(cfg.policy.name, **policy_kwargs(cfg, device))
    for module in (policy.module, *getattr(policy, "frozen_modules", ())):  # before the adapters wrap its layers
        quantize_base(module, cfg.policy.quantize, DTYPES[cfg.policy.dtype])
    apply_lora(policy, cfg)
    float32_masters(policy.module)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(policy.module)
    return policy


def offload_text_encoders(policy: FlowPolicy) -> None:
    """``policy.offload_text_encoders``: the policy moves its text encoders to the CPU (prompts are encoded)."""
    offload = getattr(policy, "offload_text_encoders", None)
    if offload is None:
        raise ValueError(f"policy.offload_text_encoders=true, but {type(policy).__name__} keeps no text encoders "
                         "to offload; set policy.offload_text_encoders=false")
    offload()
