"""The ``task`` key: its layer sets policy, prompts, rewards and judges over the method preset; the user's keys win."""

from __future__ import annotations

import dataclasses

import pytest

from flowgrove.config.files import parse_yaml, task_text
from flowgrove.config.load import Config, ConfigError, config_from_yaml_text, config_to_yaml, load_config, preset_names
from flowgrove.tasks.catalog import DEFAULT_TASK, TASKS

NUMBERS_KEYS = {"task": "numbers", "policy.name": "numbers", "policy.path": "", "data.train": "", "data.test": "",
                "rewards": {"ocr": 1.0}, "eval.judges": ["digit_pair"]}


def _get(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_every_task_has_a_layer_and_the_digits_layer_is_the_defaults():
    assert DEFAULT_TASK == "digits" and Config().task == "digits" and set(TASKS) >= {"digits", "numbers"}
    for name in TASKS:
        assert parse_yaml(task_text(name), name)["task"] == name
    # task=digits sets every key it names to the schema's default, so the default run cannot change
    assert dataclasses.asdict(load_config(None, ["task=digits"])) == dataclasses.asdict(load_config())


def test_the_numbers_layer_sets_policy_prompts_rewards_and_judges():
    cfg = load_config(None, ["task=numbers"])
    for key, value in NUMBERS_KEYS.items():
        assert _get(cfg, key) == value, key
    assert cfg.method == "dancegrpo" and cfg.rollout.group_size == 12  # the method's keys stay the preset's


@pytest.mark.parametrize("method", [m for m in preset_names() if load_config(method=m).policy.name == "digits"])
def test_a_preset_never_replaces_the_tasks_rewards(method):
    cfg = load_config(None, ["task=numbers"], method=method)  # mixgrpo's preset names digits rewards
    assert cfg.rewards == {"ocr": 1.0} and cfg.policy.name == "numbers" and cfg.eval.judges == ["digit_pair"]
    assert cfg.method == method


def test_user_keys_override_the_task(tmp_path):
    cfg = load_config(None, ["task=numbers", "rewards.digit_pair=0.5", "eval.judges=[]", "policy.path=my.safetensors"])
    assert cfg.rewards == {"ocr": 1.0, "digit_pair": 0.5}  # rewards.NAME=W patches the task's set
    assert cfg.eval.judges == [] and cfg.policy.path == "my.safetensors"
    assert load_config(None, ["task=numbers", "rewards={ocr: 2.0}"]).rewards == {"ocr": 2.0}
    assert load_config(None, ["rewards={ocr: 2.0}", "task=numbers"]).rewards == {"ocr": 2.0}  # order does not matter
    config = tmp_path / "c.yaml"
    config.write_text("task: numbers\nrewards: {ocr: 1.0, contrast: 0.25}\nrollout: {prompts_per_step: 2}\n")
    cfg = load_config(config)
    assert cfg.policy.name == "numbers" and cfg.rewards == {"ocr": 1.0, "contrast": 0.25}
    assert cfg.rollout.prompts_per_step == 2
    assert load_config(config, ["task=digits"]).policy.name == "digits"  # the override names the task


def test_resolved_config_round_trips_without_the_layer():
    cfg = load_config(None, ["task=numbers", "rewards.ocr=2"])
    assert dataclasses.asdict(config_from_yaml_text(config_to_yaml(cfg))) == dataclasses.asdict(cfg)


def test_bad_tasks_and_conflicting_presets_are_one_line_errors():
    with pytest.raises(ConfigError, match="task='numbrs' is unknown; allowed: digits, numbers.*did you mean 'numbers'"):
        load_config(None, ["task=numbrs"])
    with pytest.raises(ConfigError, match="method flowgrpo-sd3 is a recipe for policy sd3; drop task="):
        load_config(None, ["task=numbers"], method="flowgrpo-sd3")
    assert load_config(method="flowgrpo-sd3", overrides=["policy.path=x"]).policy.name == "sd3"  # no task named
