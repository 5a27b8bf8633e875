"""Seconds per training step of the digits and numbers tasks side by side: one process, the steps interleaved (the
order alternating), the same method, so machine noise hits both alike.

Usage: python scripts/task_cost.py STEPS [key=value ...] [digits:key=value ...] [numbers:key=value ...]
(plain overrides go to both tasks, ``TASK:key=value`` to one). Prints the median seconds of a step and of its
rollout, reward and update phases per task, and the ratio numbers / digits.
"""

from __future__ import annotations

import json
import statistics
import sys

from flowgrove.config.load import load_config
from flowgrove.training.setup import build_trainer

TASKS = ("digits", "numbers")
PHASES = ("step", "rollout", "reward", "update")


def main() -> None:
    steps, extra = int(sys.argv[1]), sys.argv[2:]
    per = {t: [item.split(":", 1)[1] if item.startswith(f"{t}:") else item for item in extra
               if ":" not in item.split("=", 1)[0] or item.startswith(f"{t}:")] for t in TASKS}
    trainers = {t: build_trainer(load_config(None, [f"task={t}", "run.threads=1", "run.progress=false",
                                                    f"train.steps={steps}", *per[t]])) for t in TASKS}
    seconds = {t: {p: [] for p in PHASES} for t in TASKS}
    for i in range(steps):
        for t in (TASKS if i % 2 == 0 else TASKS[::-1]):
            metrics = trainers[t].step()
            for p in PHASES:
                seconds[t][p].append(metrics[f"seconds_{p}"])
    medians = {t: {p: round(statistics.median(v), 4) for p, v in s.items()} for t, s in seconds.items()}
    print(json.dumps({"steps": steps, "overrides": extra, "median_seconds": medians,
                      "ratio_numbers_to_digits": round(medians["numbers"]["step"] / medians["digits"]["step"], 3)}))


if __name__ == "__main__":
    main()
