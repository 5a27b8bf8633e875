"""``flowgrove memory``: the peak GiB per GPU of a config, predicted before anything loads, and ``--table``: which
settings fit each shipped family on 24, 48, 80 and 141 GiB cards, on 1 and 8 GPUs.

The config gives a :class:`~flowgrove.bench.memory.MemoryPlan` (:func:`plan_of`; the policy factory's defaults fill
the sizes ``policy.options`` leaves out); the family's shipped counts and measured activation lines
(:func:`~flowgrove.bench.memory_sizes.shipped_sizes`) give the rest; :func:`~flowgrove.bench.memory.predict` is the
arithmetic. ``flowgrove train`` calls :func:`warn_if_too_big` before it loads a model.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from flowgrove.bench.memory import GIB, MemoryEstimate, MemoryPlan, ModelSizes, predict
from flowgrove.bench.memory_sizes import family_configs, shipped_sizes
from flowgrove.config.schema import Config
from flowgrove.messages import ConfigError, note
from flowgrove.parallel.engine import choose_kind
from flowgrove.policies.base import policy_factory
from flowgrove.policies.wan_folder import check_expert, experts_in_index

DEFAULT_FAMILY = {"flux1": "flux1-dev", "sd3": "sd3.5-medium", "qwen_image": "qwen-image", "wan": "wan2.1-14b",
                  "hunyuan_video": "hunyuan-video", "sdxl": "sdxl", "z_image": "z-image", "flux2": "flux2-dev",
                  "flux_kontext": "flux1-kontext-dev",
                  "qwen_image_edit": "qwen-image-edit"}  # policy.name -> the family --model defaults to
CARDS = (24, 48, 80, 141)  # GiB per GPU of the --table's columns
REWARD_MODELS = {"hpsv2": "clip-h", "pickscore": "clip-h", "clipscore": "clip-l", "aesthetic": "clip-l"}


ARCHITECTURE_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "ffn_dim",
                     "block_out_channels", "transformer_layers_per_block")  # what tells a family's sizes apart


def expert_count(path: str) -> int:
    """Transformers of the folder at ``path`` by the rule the wan policy loads by (``experts_in_index``); 1 without
    a readable ``model_index.json``."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text()) if path else {}
    except (OSError, ValueError):  # loading the folder reports it; the prediction takes one expert
        return 1
    return experts_in_index(index) if isinstance(index, dict) else 1


def family_of_folder(policy: str, path: str) -> str | None:
    """The shipped family of ``policy`` whose transformer (or UNet) config the folder's matches on the
    architecture keys and whose expert count it has, or None (no folder, no readable config file, no match)."""
    for sub in ("transformer", "unet"):
        config = Path(path) / sub / "config.json" if path else None
        if config is not None and config.is_file():
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError):  # loading the folder reports it; the prediction takes the default
                return None
            if not isinstance(data, dict):
                return None
            for name, family in family_configs().items():
                shipped = family["transformer"][1]
                if (family["policy"] == policy and family.get("experts", 1) == expert_count(path)
                        and all(data.get(k) == shipped[k] for k in ARCHITECTURE_KEYS if k in shipped)):
                    return name
    return None


def family_of(cfg: Config, model: str | None) -> str:
    """The shipped family to predict: ``--model``, else the one whose config ``policy.path``'s transformer has, else
    the one ``policy.name`` defaults to."""
    names = sorted(family_configs())
    if model is not None:
        if model not in names:
            raise ConfigError(f"--model {model} is not a shipped family; choose one of: {', '.join(names)}")
        return model
    if cfg.policy.name not in DEFAULT_FAMILY:
        raise ConfigError(f"policy.name={cfg.policy.name} has no shipped memory model; set policy.name to one of "
                          f"{', '.join(sorted(DEFAULT_FAMILY))}, or pass --model NAME for the nearest of "
                          f"{', '.join(names)}")
    return family_of_folder(cfg.policy.name, cfg.policy.path) or DEFAULT_FAMILY[cfg.policy.name]


def policy_settings(cfg: Config) -> dict:
    """``policy.options`` over the policy factory's defaults (height, width, num_frames, max_sequence_length ...)."""
    params = inspect.signature(policy_factory(cfg.policy.name)).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **dict(cfg.policy.options)}


def reward_parameters(cfg: Config) -> int:
    """Parameters of the reward models a run keeps on the GPU (the CLIP-based ones; others are not counted)."""
    from flowgrove.bench.memory_sizes import reward_model_params

    used = [n for n, w in cfg.rewards.items() if float(w) != 0] + [str(n) for n in cfg.eval.judges]
    inner = [str(cfg.reward_options.get(n, {}).get("reward", "")) if n == "video" else n for n in used]
    return sum(reward_model_params(REWARD_MODELS[n]) for n in inner if n in REWARD_MODELS)


def setting(cfg: Config, key: str, default: str) -> str:
    """``cfg``'s dotted ``key``, or ``default`` where the schema has no such key (``policy.quantize``,
    ``train.optimizer`` and ``run.offload`` are read this way, so configs from before them work)."""
    section, name = key.split(".")
    return str(getattr(getattr(cfg, section), name, default))


def decode_rows(cfg: Config, gpus: int) -> int:
    """Samples of one VAE call: ``rollout.decode_batch``, or (0: no limit) a step's samples on one GPU."""
    r = cfg.rollout
    return r.decode_batch or -(-r.prompts_per_step * r.group_size // gpus)


def expert_of(options: dict, family: dict) -> str:
    """``policy.options.expert`` (``high`` by default), checked against the family's experts.

    Raises:
        ConfigError: an unknown value, or ``low`` / ``both`` on a one-expert family.
    """
    expert = str(options.get("expert", "high"))
    check_expert(expert, 2, Path(family["title"]))  # the value; the family's count below
    if expert != "high" and family.get("experts", 1) == 1:
        two = [name for name, f in family_configs().items() if f.get("experts", 1) == 2]
        raise ConfigError(f"policy.options.expert={expert} needs a two-expert model, and {family['title']} has one "
                          f"transformer; pass --model {' or '.join(two)} (or its folder as policy.path), or drop the "
                          "option")
    return expert


def plan_of(cfg: Config, family: dict, gpus: int) -> MemoryPlan:
    """The memory-relevant settings of ``cfg`` on ``gpus`` GPUs."""
    options = policy_settings(cfg) if cfg.policy.name == family["policy"] else {}
    text = family.get("text_fixed", 0) + int(options.get("max_sequence_length", family["text_tokens"]))
    guidance = float(options.get("guidance_scale", 4.5 if family["cfg"] else 1.0))
    return MemoryPlan(
        gpus=gpus, dtype=cfg.policy.dtype, lora_rank=cfg.policy.lora_rank, lora_targets=tuple(cfg.policy.lora_targets),
        quantize=setting(cfg, "policy.quantize", "none"), optimizer=setting(cfg, "train.optimizer", "adamw"),
        offload=setting(cfg, "run.offload", "none"),
        parallel=choose_kind(cfg.run.parallel, gpus, cfg.policy.lora_rank),
        checkpointing=cfg.train.gradient_checkpointing, micro_batch=cfg.train.micro_batch,
        cfg_graph=family["cfg"] and guidance > 1 and not options.get("detach_uncond", False),
        height=int(options.get("height", 1024)), width=int(options.get("width", 1024)),
        frames=int(options.get("num_frames", 1)) if family["video"] else 1, text_tokens=text,
        input_pixels=int(options.get("image_area", 0)), expert=expert_of(options, family),
        decode_batch=decode_rows(cfg, gpus), ema=cfg.train.ema_decay > 0, reference=cfg.train.kl_beta > 0,
        text_encoders=not cfg.policy.offload_text_encoders, reward_params=reward_parameters(cfg))


@dataclass(frozen=True)
class Prediction:
    """What ``flowgrove memory`` reports: the family, the plan and the estimate."""

    family: str
    plan: MemoryPlan
    estimate: MemoryEstimate


def predict_config(cfg: Config, gpus: int = 1, model: str | None = None) -> Prediction:
    """The prediction for ``cfg`` on ``gpus`` GPUs (loads no model: reads the shipped sizes)."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be at least 1")
    name = family_of(cfg, model)
    plan = plan_of(cfg, family_configs()[name], gpus)
    return Prediction(name, plan, predict(shipped_sizes()[name], plan))


def report_lines(p: Prediction) -> list[str]:
    """The text report: the settings, each line item and the two phases' peaks in GiB."""
    plan, gib = p.plan, p.estimate.gib()
    mode = f"LoRA r{plan.lora_rank}" if plan.lora_rank else "full fine-tune"
    size = f"{plan.frames}x{plan.height}x{plan.width}" if plan.frames > 1 else f"{plan.height}x{plan.width}"
    head = (f"{family_configs()[p.family]['title']} {mode}, {plan.dtype}, quantize {plan.quantize}, {plan.optimizer}, "
            f"offload {plan.offload}, {plan.parallel} on {plan.gpus} GPU(s), {size}")
    head += (f", micro_batch {plan.micro_batch}{' (x2 CFG)' if plan.cfg_graph else ''}, checkpointing "
             f"{'on' if plan.checkpointing else 'off'}")
    lines = [head, "predicted GiB per GPU:"]
    lines += [f"  {k:32s} {v:8.2f}" for k, v in gib.items()]
    fits = [c for c in CARDS if gib["peak"] <= c]
    lines.append(f"fits on: {', '.join(f'{c} GiB' for c in fits) or 'none of ' + ', '.join(map(str, CARDS)) + ' GiB'}"
                 " (not counted: CUDA context, NCCL buffers, fragmentation: about 1-3 GiB)")
    return lines


def report_json(p: Prediction) -> str:
    return json.dumps({"family": p.family, "plan": asdict(p.plan), "gib": p.estimate.gib()}, indent=2)


# ---- --table: which settings fit each family, by card and GPU count ----

LORA_LADDER = (("bf16", {}), ("+ckpt", {"checkpointing": True}),
               ("+ckpt int8", {"checkpointing": True, "quantize": "int8"}),
               ("+ckpt nf4", {"checkpointing": True, "quantize": "nf4"}))
FULL_LADDER = (("ckpt", {"checkpointing": True}), ("ckpt 8bit-Adam", {"checkpointing": True, "optimizer": "adamw8bit"}))
FSDP_LADDER = FULL_LADDER + (("ckpt offload-params", {"checkpointing": True, "offload": "params"}),)  # FSDP2's offload


def ladder(lora: bool, gpus: int) -> tuple:
    """The table's settings, least costly first: LoRA adds checkpointing, then a quantised base; a full fine-tune
    checkpoints, then 8-bit AdamW, then (FSDP2, several GPUs) offloads parameters, gradients and optimizer state
    (torch's FSDP2 has no optimizer-only offload)."""
    return LORA_LADDER if lora else FULL_LADDER if gpus == 1 else FSDP_LADDER


def table_plan(family: dict, lora: bool, gpus: int) -> MemoryPlan:
    """The table's base setting: bf16, per-GPU micro-batch 1, text encoders offloaded, no reward model on the GPU,
    images at 1024^2, videos at their policy's default size; LoRA r32 on the attention projections."""
    params = inspect.signature(policy_factory(family["policy"])).parameters
    size = {k: params[k].default for k in ("height", "width", "num_frames") if k in params}
    return MemoryPlan(gpus=gpus, dtype="bfloat16", lora_rank=32 if lora else 0,
                      parallel="ddp" if lora or gpus == 1 else "fsdp",
                      height=size["height"] if family["video"] else 1024,
                      width=size["width"] if family["video"] else 1024,
                      frames=size.get("num_frames", 1) if family["video"] else 1,
                      text_tokens=family.get("text_fixed", 0) + family["text_tokens"])


def first_fit(sizes: ModelSizes, base: MemoryPlan, settings: tuple, card: float) -> str:
    """The first of ``settings`` (least costly first) whose peak fits ``card`` GiB, with its peak, or ``-``."""
    for label, change in settings:
        peak = predict(sizes, replace(base, **change)).peak / GIB
        if peak <= card:
            return f"{label} ({peak:.0f})"
    return "-"


def table_lines() -> list[str]:
    """The markdown table of ``--table``."""
    families, all_sizes = family_configs(), shipped_sizes()
    lines = ["| model | tuning | GPUs | " + " | ".join(f"{c} GiB" for c in CARDS) + " |",
             "|---|---|---|" + "---|" * len(CARDS)]
    for name, family in families.items():
        for lora in (True, False):
            for gpus in (1, 8):
                base = table_plan(family, lora, gpus)
                cells = [first_fit(all_sizes[name], base, ladder(lora, gpus), c) for c in CARDS]
                lines.append(f"| {family['title']} | {'LoRA r32' if lora else 'full'} | {gpus} | " + " | ".join(cells)
                             + " |")
    return lines


def too_big_note(p: Prediction, device_gib: float) -> str | None:
    """The note of :func:`warn_if_too_big` when ``p``'s peak exceeds ``device_gib``, else None."""
    peak = p.estimate.peak / GIB
    if peak <= device_gib:
        return None
    return (f"predicted peak {peak:.1f} GiB per GPU ({p.family}) exceeds this GPU's {device_gib:.1f} GiB; `flowgrove "
            "memory` with the same config and overrides shows where it goes (train.gradient_checkpointing, "
            "policy.quantize, train.optimizer=adamw8bit and run.offload lower it)")


def warn_if_too_big(cfg: Config, device: torch.device, gpus: int) -> None:
    """``flowgrove train``: one note when the predicted peak exceeds the CUDA device's memory (CPU runs and policies
    without a shipped memory model are skipped)."""
    if device.type != "cuda" or cfg.policy.name not in DEFAULT_FAMILY:
        return
    message = too_big_note(predict_config(cfg, gpus), torch.cuda.get_device_properties(device).total_memory / GIB)
    if message:
        note(message)
