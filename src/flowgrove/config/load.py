"""Loading a config: presets, YAML files and dotted overrides through OmegaConf over the schema's defaults.

Precedence, lowest first: dataclass defaults < the method preset (``presets/<method>.yaml``) < the task layer
(``tasks/<task>.yaml``, applied only when a config file or an override names ``task``) < a config file <
``key=value`` overrides. The task sits above the preset so that a method keeps its algorithm while the task keeps its
policy, prompts, rewards and judges (a preset's ``rewards`` never replaces the named task's); the file and the
overrides still change any key. Unknown keys and bad values raise :class:`ConfigError`, which names the key, the
allowed values and the closest match.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowgrove.config.checks import check_config
from flowgrove.config.files import _as_dict, _read_config_file, _yaml_problem, parse_yaml, preset_names, preset_summary, preset_text  # noqa: F401
from flowgrove.config.files import task_text
from flowgrove.config.schema import (_SECTIONS, AdvantageConfig, Config, DataConfig, EvalConfig, GuardConfig,  # noqa: F401
                                     PolicyConfig, RolloutConfig, RunConfig, SamplerConfig, TrainConfig, TreeConfig)
from flowgrove.messages import ConfigError, did_you_mean, one_line


def _section_of(f: dataclasses.Field) -> type | None:
    return _SECTIONS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))


def _check_keys(data: Any, schema: type, prefix: str = "") -> None:
    """Reject unknown keys, a section set to a value and a value set to a mapping, before OmegaConf does."""
    if not isinstance(data, dict) or schema is dict:
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        name = prefix + str(key)
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(f"unknown config key {name!r}{did_you_mean(str(key), list(fields))}; allowed here: {allowed}")
        section = _section_of(fields[key])
        if section is not None and not isinstance(value, dict):
            first = dataclasses.fields(section)[0].name
            raise ConfigError(f"{name} is a section, not a value (got {name}={value!r}); set its keys, for example {name}.{first}=...")
        if section is not None:
            _check_keys(value, section, name + ".")
        elif isinstance(value, dict) and fields[key].type not in ("dict", dict):
            raise ConfigError(f"{name} takes one value, not the mapping {value!r}; write {name}=VALUE")


def _check_values(cfg: Any, prefix: str = "") -> None:
    """Choices, lower bounds and finiteness from the field metadata."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_values(value, key + ".")
            continue
        choices, low = f.metadata.get("choices"), f.metadata.get("low")
        if choices and value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(choices)}{did_you_mean(str(value), list(choices))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number ({f.metadata['help'].rstrip('.')})")
        if low is not None and value < low:
            raise ConfigError(f"{key}={value!r} must be >= {low} ({f.metadata['help'].rstrip('.')})")


def _merged(low: dict, high: dict) -> dict:
    """Nested dicts merged key by key, ``high`` winning; a value that is not a dict replaces what was there."""
    out = dict(low)
    for key, value in high.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _parse_override(item: str) -> dict:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key=value (for example train.lr=3e-4)")
    try:
        data = _as_dict(OmegaConf.from_dotlist([item]), f"override {item!r}")
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r} has a malformed value: {_yaml_problem(err)}; complete or quote it "
                          "(for example train.betas=[0.9,0.999])") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {item!r} cannot be parsed: {one_line(err)}") from None
    _check_keys(data, Config)
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", ...]`` -> nested dict; each item is checked on its own, so ``train=5`` is an error even
    when a later ``train.steps=...`` would hide it."""
    merged: dict = {}
    for item in overrides:
        merged = _merged(merged, _parse_override(item))
    return merged


def _patch_rewards(lower: list[dict], overrides: list[str], over: dict) -> None:
    """``rewards.NAME=W`` overrides set one weight of the reward set below them; ``rewards={...}`` replaces it."""
    if "rewards" not in over or any(item.split("=", 1)[0].strip() == "rewards" for item in overrides):
        return
    base = next((layer["rewards"] for layer in reversed(lower) if "rewards" in layer), Config().rewards)
    if isinstance(base, dict) and isinstance(over["rewards"], dict):
        over["rewards"] = {**base, **over["rewards"]}


def task_layer(task: str, preset: dict, method: str) -> dict:
    """The keys task ``task`` sets; a preset that names another policy (a real model's recipe) is an error, not a
    silent swap of its model."""
    layer = parse_yaml(task_text(task), f"task {task}")
    theirs = (preset.get("policy") or {}).get("name")
    if theirs is not None and theirs != layer["policy"]["name"]:
        raise ConfigError(f"task={task} uses policy {layer['policy']['name']}, but method {method} is a recipe for policy "
                          f"{theirs}; drop task= to train {theirs}, or pick a method made for the embedded tasks "
                          "(flowgrove methods)")
    return layer


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, method: str | None = None) -> Config:
    """Build a validated :class:`Config` from the preset, the named task, an optional YAML file and dotted overrides.

    A ``rewards`` mapping of a later layer replaces the reward set of the earlier ones; ``rewards.NAME=W``
    overrides change one weight of it.
    """
    overrides = list(overrides or [])
    upper = [_read_config_file(path)] if path is not None else []
    over = parse_overrides(overrides)
    chosen = method or over.get("method") or next((layer["method"] for layer in upper if "method" in layer), Config.method)
    task = over.get("task") or next((layer["task"] for layer in upper if "task" in layer), None)
    preset = parse_yaml(preset_text(str(chosen)), f"preset {chosen}")
    lower = [preset, *([task_layer(str(task), preset, str(chosen))] if task is not None else []), *upper]
    _patch_rewards(lower, overrides, over)
    return build_config([*lower, over, *([{"method": method}] if method is not None else [])])


def _merge_layer(merged: DictConfig, layer: dict) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"bad value for {key}: {one_line(str(err).splitlines()[0])}") from None


def build_config(layers: list[dict]) -> Config:
    """Merge dict layers over the schema defaults and validate, cross-field checks included (before any model loads).

    The ``rewards`` mapping of a layer replaces the earlier ones whole (reward sets do not merge).
    """
    merged, rewards = OmegaConf.structured(Config), None
    for layer in layers:
        _check_keys(layer, Config)
        if "rewards" in layer:
            rewards = layer["rewards"]
        merged = _merge_layer(merged, {k: v for k, v in layer.items() if k != "rewards"})
    cfg = OmegaConf.to_object(merged)
    cfg.rewards = cfg.rewards if rewards is None else rewards
    _check_values(cfg)
    if cfg.method not in preset_names():
        raise ConfigError(f"method={cfg.method!r} is unknown; allowed: {', '.join(preset_names())}{did_you_mean(cfg.method, preset_names())}")
    check_config(cfg)
    cfg.rewards = {str(name): float(weight) for name, weight in cfg.rewards.items()}
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml_text(text: str, source: str = "saved config") -> Config:
    """Load a resolved config written by :func:`config_to_yaml` (used on resume); errors name ``source``."""
    try:
        return build_config([parse_yaml(text, source)])
    except ConfigError as err:
        raise ConfigError(err if str(err).startswith(source) else f"{source}: {err}") from None
