"""Config schema, presets and the errors users see for bad keys and values."""

from __future__ import annotations

import pytest

from flowgrove.config.load import ConfigError, config_from_yaml_text, config_to_yaml, load_config, preset_names


def test_every_preset_loads_and_round_trips():
    for name in preset_names():
        cfg = load_config(method=name)
        assert cfg.method == name
        assert config_from_yaml_text(config_to_yaml(cfg)) == cfg


def test_precedence_preset_file_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: flowgrpo\ntrain: {lr: 0.5}\nsampler: {num_steps: 12}\n")
    cfg = load_config(path, ["train.lr=0.25"])
    assert cfg.method == "flowgrpo"
    assert cfg.sampler.noise == "flow"  # from the flowgrpo preset
    assert cfg.sampler.num_steps == 12  # the file beats the preset
    assert cfg.train.lr == 0.25  # the override beats the file


def test_unknown_key_names_the_closest_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*did you mean 'lr'.*allowed here"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'sampeler'.*did you mean 'sampler'"):
        load_config(None, ["sampeler.num_steps=3"])


def test_bad_values_name_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"sampler.noise='flwo'.*constant, flow.*did you mean 'flow'"):
        load_config(None, ["sampler.noise=flwo"])
    with pytest.raises(ConfigError, match=r"train.lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"rollout.group_size=0 must be >= 1"):
        load_config(None, ["rollout.group_size=0"])
    with pytest.raises(ConfigError, match=r"method='dancegrp' is unknown.*did you mean 'dancegrpo'"):
        load_config(method="dancegrp")
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config("/nonexistent.yaml")


def test_every_preset_runs_the_guard_by_default():
    """Issue 18: a user whose run starts to hack sees it in the log: every preset evaluates periodically with the
    guard on, warning (not stopping) on an alarm."""
    for name in preset_names():
        cfg = load_config(method=name)
        assert cfg.eval.every > 0 and cfg.guard.enabled and cfg.guard.action == "warn", name


def test_loss_terms_that_need_noise_or_a_bound_are_refused_before_any_model_loads():
    with pytest.raises(ConfigError, match=r"train.ratio_norm, train.trust_region need SDE steps with noise.*sampler.noise_level=0"):
        load_config(None, ["train.ratio_norm=grpo_guard", "train.trust_region=dppo", "sampler.noise_level=0"])
    with pytest.raises(ConfigError, match=r"train.step_weight needs SDE steps"):
        load_config(None, ["train.step_weight=tempflow", "sampler.noise_level=0"])
    with pytest.raises(ConfigError, match=r"train.trust_region_kl=0.0 must be > 0 with train.trust_region=dppo"):
        load_config(None, ["train.trust_region=dppo", "train.trust_region_kl=0.0"])
    with pytest.raises(ConfigError, match=r"train.clip_range=0.0 must be > 0 with train.trust_region=clip"):
        load_config(None, ["train.clip_range=0.0"])
    with pytest.raises(ConfigError, match=r"train.ratio_norm='guard'.*none, grpo_guard.*did you mean 'grpo_guard'"):
        load_config(None, ["train.ratio_norm=guard"])
    cfg = load_config(None, ["train.trust_region=dppo", "train.clip_range=0.0"])  # dppo has no clip
    assert cfg.train.trust_region == "dppo"


def test_guard_and_tempflow_presets_set_their_terms():
    guard, tempflow = load_config(method="grpo-guard"), load_config(method="tempflow-grpo")
    assert (guard.train.ratio_norm, guard.train.step_weight, guard.train.trust_region) == ("grpo_guard", "grpo_guard", "clip")
    assert tempflow.train.step_weight == "tempflow" and tempflow.train.ratio_norm == "none"
    assert tempflow.window.enabled and tempflow.window.size == 1 and tempflow.rollout.same_noise_in_group
    assert load_config().train.trust_region == "clip" and load_config().train.ratio_norm == "none"
