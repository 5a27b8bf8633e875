"""Judge saved runs with rewards they may not have trained on: each run's latest weights (EMA when it has them) and
the base policy, scored by ocr, digit_classifier and boldness on the runs' held-out prompts and seeds.

Usage: python scripts/judge_runs.py RUN [RUN ...]
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from flowgrove.recipes.sample import load_run
from flowgrove.rewards import build_reward
from flowgrove.training.trainer import GRPOTrainer, evaluate_policy

JUDGES = ("ocr", "digit_classifier", "boldness")


def judge(trainer: GRPOTrainer, rewards: dict) -> dict:
    with trainer.weights_swapped(trainer.ema) if trainer.ema is not None else nullcontext():
        result = evaluate_policy(trainer.policy, trainer.test_cond, trainer.test_prompts, rewards,
                                 torch.ones(len(rewards)), trainer.cfg)
    return {k: round(v, 4) for k, v in result.items() if k != "reward"}


def main() -> None:
    rewards = {name: build_reward(name) for name in JUDGES}
    print("base", judge(load_run(None), rewards))
    for run in sys.argv[1:]:
        print(run, judge(load_run(run), rewards))


if __name__ == "__main__":
    main()
