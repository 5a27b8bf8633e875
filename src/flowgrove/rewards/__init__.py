"""Rewards (layer 4, the model boundary): ``(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32`` callables built
by name, and the HTTP server that serves any of them. May import the root modules, math and tasks.

Built in: ``digit_classifier``, ``boldness``, ``contrast``, ``brightness`` (the digits task), ``digit_pair`` (the
numbers task's judge), ``ocr``,
``vlm_judge`` (an OpenAI-compatible judge server), ``remote`` (a ``flowgrove serve-reward`` server) and
``video`` (any image reward on sampled frames). Real reward models (``hpsv2``, ``pickscore``, ``clipscore``,
``aesthetic``, ``imagereward``; docs/rewards.md; ``clip_direction`` for edits, docs/editing.md) import
transformers inside their factories.
"""

from flowgrove.rewards import clip_direction as _clip_direction  # noqa: F401  (registers clip_direction)
from flowgrove.rewards import clip_family as _clip_family  # noqa: F401  (registers hpsv2, pickscore, ...)
from flowgrove.rewards import digits as _digits  # noqa: F401  (registers the digits rewards)
from flowgrove.rewards import imagereward as _imagereward  # noqa: F401  (registers imagereward)
from flowgrove.rewards import http_judge as _http_judge  # noqa: F401  (registers vlm_judge)
from flowgrove.rewards import numbers as _numbers  # noqa: F401  (registers digit_pair)
from flowgrove.rewards import ocr as _ocr  # noqa: F401  (registers ocr)
from flowgrove.rewards import remote as _remote  # noqa: F401  (registers remote)
from flowgrove.rewards import video as _video  # noqa: F401  (registers video)
from flowgrove.rewards.base import RewardFn, build_reward, register_reward, reward_names

__all__ = ["RewardFn", "build_reward", "register_reward", "reward_names"]
