"""Seconds per training step of the default digits run at 1 thread, 2 threads and torch's default, interleaved step
by step in one process, so that every setting sees the same machine load.

Usage: python scripts/threads_bench.py STEPS [SPINNERS]   (SPINNERS busy-loop processes run alongside)
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time

import torch

from flowgrove.config.load import load_config
from flowgrove.training.setup import build_trainer


def spin() -> None:
    while True:
        pass


def main() -> None:
    steps = int(sys.argv[1])
    spinners = [mp.Process(target=spin, daemon=True) for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 0)]
    for proc in spinners:
        proc.start()
    default = torch.get_num_threads()
    settings = sorted({1, 2, default})
    trainers = {n: build_trainer(load_config(overrides=["run.threads=0", "run.progress=false"])) for n in settings}
    times: dict[int, list[float]] = {n: [] for n in settings}
    for _ in range(steps):
        for n in settings:
            torch.set_num_threads(n)
            start = time.perf_counter()
            trainers[n].step()
            times[n].append(time.perf_counter() - start)
    base = statistics.median(times[1])
    for n in settings:
        median = statistics.median(times[n])
        label = " (torch default)" if n == default else ""
        print(f"threads={n}{label}: median {median:.3f} s/step, {median / base:.2f}x of 1 thread; spinners={len(spinners)}")


if __name__ == "__main__":
    main()
