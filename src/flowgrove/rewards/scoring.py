"""Several rewards of one batch scored at the same time, one thread each (HTTP and remote rewards mostly wait)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import torch
from torch import Tensor

from flowgrove.messages import one_line
from flowgrove.rewards.base import RewardFn


class RewardFailure(RuntimeError):
    """A reward raised while scoring a batch (a server down, a model error): ``name`` is the reward, ``detail`` its
    error in one line; the message is ``reward NAME raised DETAIL``."""

    def __init__(self, name: str, error: Exception):
        self.name, self.detail = name, f"{type(error).__name__}: {one_line(error).rstrip('.')}"
        super().__init__(f"reward {name!r} raised {self.detail}")


def _scored(name: str, fn: RewardFn, images: Tensor, prompts: Sequence[str]) -> Tensor:
    try:
        return fn(images, prompts).float()
    except Exception as err:  # noqa: BLE001  (any reward's own error, named)
        raise RewardFailure(name, err) from err


def score_rewards(rewards: Mapping[str, RewardFn], images: Tensor, prompts: Sequence[str]) -> list[Tensor]:
    """``[fn(images, prompts).float() for fn in rewards.values()]``, each ``[B]``, computed in parallel threads.

    One reward runs in the calling thread. With several, each gets a thread, so a step waits for the slowest
    reward instead of their sum; the caller's grad mode (thread-local in torch) is carried into the threads, and
    the first reward (in order) that raises re-raises here as :class:`RewardFailure`.
    """
    if len(rewards) <= 1:
        return [_scored(name, fn, images, prompts) for name, fn in rewards.items()]
    grad = torch.is_grad_enabled()

    def run(name: str, fn: RewardFn) -> Tensor:
        with torch.set_grad_enabled(grad):
            return _scored(name, fn, images, prompts)

    with ThreadPoolExecutor(max_workers=len(rewards), thread_name_prefix="reward") as pool:
        futures = [pool.submit(run, name, fn) for name, fn in rewards.items()]
        return [f.result() for f in futures]
