"""Rewards: ``(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32`` callables built by name.

Built in: ``digit_classifier``, ``boldness``, ``contrast``, ``brightness`` (the digits task), ``ocr``,
``vlm_judge`` (an OpenAI-compatible judge server), ``remote`` (a ``flowgrove serve-reward`` server) and
``video`` (any image reward on sampled frames). Heavy reward models import their packages inside their factories.
"""

from flowgrove.rewards import digits as _digits  # noqa: F401  (registers the digits rewards)
from flowgrove.rewards import http_judge as _http_judge  # noqa: F401  (registers vlm_judge)
from flowgrove.rewards import ocr as _ocr  # noqa: F401  (registers ocr)
from flowgrove.rewards import remote as _remote  # noqa: F401  (registers remote)
from flowgrove.rewards import video as _video  # noqa: F401  (registers video)
from flowgrove.rewards.base import RewardFn, build_reward, register_reward, reward_names

__all__ = ["RewardFn", "build_reward", "register_reward", "reward_names"]
