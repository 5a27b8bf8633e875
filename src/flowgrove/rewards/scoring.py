"""Several rewards of one batch scored at the same time, one thread each (HTTP and remote rewards mostly wait)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import torch
from torch import Tensor

from flowgrove.rewards.base import RewardFn


def score_rewards(rewards: Mapping[str, RewardFn], images: Tensor, prompts: Sequence[str]) -> list[Tensor]:
    """``[fn(images, prompts).float() for fn in rewards.values()]``, each ``[B]``, computed in parallel threads.

    One reward runs in the calling thread. With several, each gets a thread, so a step waits for the slowest
    reward instead of their sum; the caller's grad mode (thread-local in torch) is carried into the threads, and
    the first reward (in order) that raises re-raises here.
    """
    fns = list(rewards.values())
    if len(fns) <= 1:
        return [fn(images, prompts).float() for fn in fns]
    grad = torch.is_grad_enabled()

    def run(fn: RewardFn) -> Tensor:
        with torch.set_grad_enabled(grad):
            return fn(images, prompts).float()

    with ThreadPoolExecutor(max_workers=len(fns), thread_name_prefix="reward") as pool:
        futures = [pool.submit(run, fn) for fn in fns]
        return [f.result() for f in futures]
