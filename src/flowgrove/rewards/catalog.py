"""One line per registered reward for ``flowgrove rewards``: the first line of its factory's docstring."""

from __future__ import annotations

import inspect

from flowgrove.rewards import base


def reward_summaries() -> dict[str, str]:
    """Registered reward name -> the first docstring line of its factory ("" when it has none)."""
    # base.py exposes names and build only; the factories' docstrings are read from its registry here.
    factories = base._REWARDS._factories  # noqa: SLF001
    return {name: (inspect.getdoc(factories[name]) or "").split("\n", 1)[0].strip() for name in base.reward_names()}
