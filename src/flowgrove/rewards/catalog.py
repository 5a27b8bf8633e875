"""One line per registered reward for ``flowgrove rewards``: the first line of its factory's docstring."""

from __future__ import annotations

import inspect

from flowgrove.rewards import base


def reward_summaries() -> dict[str, str]:
    """Registered reward name -> the first docstring line of its factory ("" when it has none)."""
    return {name: (inspect.getdoc(base.reward_factory(name)) or "").split("\n", 1)[0].strip() for name in base.reward_names()}
