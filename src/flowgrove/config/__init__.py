"""Configuration (layer 5): the schema (dataclasses), loading presets, files and overrides, the checks that run before
any model loads, and the presets. May import the root modules, math, tasks, policies and rewards (reward names)."""

from flowgrove.config.load import (AdvantageConfig, Config, ConfigError, DataConfig, EvalConfig, GuardConfig,
                                   PolicyConfig, RolloutConfig, RunConfig, SamplerConfig, TrainConfig, TreeConfig,
                                   build_config, config_from_yaml_text, config_to_yaml, load_config, parse_overrides,
                                   preset_names, preset_summary, preset_text)

__all__ = ["AdvantageConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "GuardConfig", "PolicyConfig",
           "RolloutConfig", "RunConfig", "SamplerConfig", "TrainConfig", "TreeConfig", "build_config",
           "config_from_yaml_text", "config_to_yaml", "load_config", "parse_overrides", "preset_names", "preset_summary",
           "preset_text"]
