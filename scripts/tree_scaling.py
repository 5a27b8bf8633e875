"""BranchGRPO's scaling setting on digits: a K-ary tree with 4 splits (0, 3, 6, 9; K = 3: 81 leaves) against
DanceGRPO with as many samples per prompt, every step trained. Prints, per method, the median seconds of the rollout,
the reward and the update per step (steps interleaved), the model calls per sample, and where the tree's calls are.

Usage: python scripts/tree_scaling.py [K] [STEPS]
"""

from __future__ import annotations

import statistics
import sys

from flowgrove.config import load_config
from flowgrove.training import method
from flowgrove.training.setup import build_trainer


def main() -> None:
    k, steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3, int(sys.argv[2]) if len(sys.argv) > 2 else 4
    leaves = k ** 4
    common = ["rollout.prompts_per_step=2", "run.threads=1", "run.progress=false", "eval.every=0", "sampler.num_steps=20"]
    configs = {
        "dancegrpo": load_config(method="dancegrpo", overrides=[*common, f"rollout.group_size={leaves}",
                                                                  "train.timestep_fraction=1.0"]),
        "branchgrpo": load_config(method="branchgrpo", overrides=[*common, f"tree.branching={k}"]),
    }
    forest = method.forest(configs["branchgrpo"], 1)
    after = forest.nodes_per_depth[max(forest.split_steps) + 1:forest.num_steps]  # calls of the steps after the last split
    calls = forest.model_calls
    print(f"tree K={k}: {forest.num_leaves} leaves, {calls} model calls per tree, {forest.nfe_per_leaf:.2f} per leaf; "
          f"{sum(after)} of them ({sum(after) / calls:.0%}) after the last split; a chain needs 20 per sample")
    trainers = {name: build_trainer(cfg) for name, cfg in configs.items()}
    seen = {name: [] for name in trainers}
    for i in range(steps):
        for name in (list(trainers) if i % 2 == 0 else list(reversed(trainers))):
            seen[name].append(trainers[name].step())
    base = None
    for name, rows in seen.items():
        med = {part: statistics.median(r[f"seconds_{part}"] for r in rows) for part in ("rollout", "reward", "update", "step")}
        base = base or med
        print(f"{name:10s} calls/sample {rows[-1]['model_calls_per_sample']:.2f}  " +
              "  ".join(f"{part} {med[part]:.2f}s ({med[part] / base[part]:.2f}x)" for part in med))


if __name__ == "__main__":
    main()
