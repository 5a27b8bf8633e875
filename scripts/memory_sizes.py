"""Write flowgrove/assets/memory_sizes.json: every shipped family's parameter counts (meta device) and per-block
activation bytes measured on the CPU, which `flowgrove memory` reads (flowgrove.bench.memory_sizes).

  OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/memory_sizes.py [FAMILY ...]   (a few minutes for all eight)

Named families are measured again and merged into the file; with none named, all are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from flowgrove.bench.memory_sizes import SIZES_FILE, family_configs, family_sizes, sizes_to_json  # noqa: E402
from flowgrove.tasks.digits import assets_dir  # noqa: E402


def main() -> None:
    families = family_configs()
    names = sys.argv[1:] or list(families)
    path = assets_dir() / SIZES_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["_comment"] = (f"Written by scripts/memory_sizes.py (torch {torch.__version__}, CPU "
                        f"{torch.backends.cpu.get_cpu_capability()}): parameter counts of the configs in "
                        "memory_families.json on the meta device; activation lines (bytes = a + b * tokens, bfloat16) "
                        "measured on the CPU.")
    for name in names:
        start = time.perf_counter()
        data[name] = sizes_to_json(family_sizes(name, families[name]))
        print(f"{name}: {data[name]['params']:,} parameters ({time.perf_counter() - start:.0f} s)", flush=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
