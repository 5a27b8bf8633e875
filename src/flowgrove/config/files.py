"""Reading config files and presets: YAML text -> dicts of config keys, with one-line errors (line and column)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowgrove.messages import ConfigError, did_you_mean, one_line
from flowgrove.tasks.catalog import TASKS


def preset_names() -> list[str]:
    """Names of the shipped method presets."""
    folder = resources.files("flowgrove.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of a preset (its comments document the scaling to the digits task)."""
    if name not in preset_names():
        raise ConfigError(f"method={name!r} is unknown; allowed: {', '.join(preset_names())}{did_you_mean(name, preset_names())}")
    return (resources.files("flowgrove.config") / "presets" / f"{name}.yaml").read_text()


def task_text(name: str) -> str:
    """The YAML text of a task layer (``config/tasks/<name>.yaml``: the keys a task sets)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is unknown; allowed: {', '.join(TASKS)}{did_you_mean(str(name), list(TASKS))}")
    return (resources.files("flowgrove.config") / "tasks" / f"{name}.yaml").read_text()


def preset_summary(name: str) -> str:
    """The first comment line of a preset file."""
    first = preset_text(name).splitlines()[0]
    return first.lstrip("# ").strip()


def _yaml_problem(err: Exception) -> str:
    """``problem at line L, column C`` of a YAML parse error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{one_line(getattr(err, 'problem', None) or err)}{where}"


def _as_dict(node: Any, what: str) -> dict:
    if node is None:
        return {}
    data = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of config keys (key: value), got {type(data).__name__}")
    return data


def parse_yaml(text: str, what: str) -> dict:
    """YAML text -> dict of config keys; malformed YAML is a :class:`ConfigError` with its line and column."""
    try:
        node = OmegaConf.create(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(err)}; fix the syntax there") from None
    except AssertionError:  # OmegaConf.create of a YAML scalar
        raise ConfigError(f"{what} must be a mapping of config keys (key: value lines), got {text.strip()[:40]!r}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{what} cannot be read as a config: {one_line(err)}") from None
    return _as_dict(node, what)


def _read_config_file(path: str | Path) -> dict:
    what = f"config file {str(path)!r}"
    if not Path(path).exists() or Path(path).is_dir():
        raise ConfigError(f"{what} does not exist or is a folder; pass a YAML file or omit it to use the defaults")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text; pass a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{what} cannot be read ({err.strerror}); check its permissions") from None
    return parse_yaml(text, what)
