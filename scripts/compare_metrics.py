"""Compare two runs' metrics.jsonl field by field, timings left out: the check that a change kept behaviour.

Usage: python scripts/compare_metrics.py RUN_A RUN_B   (exit 0 when every non-timing value is identical)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(run: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _timing(key: str) -> bool:
    return "seconds" in key or key in {"time", "wall_seconds", "step_per_s"}


def differences(a: list[dict], b: list[dict]) -> list[str]:
    out = [f"{len(a)} rows against {len(b)}"] if len(a) != len(b) else []
    for x, y in zip(a, b):
        for key in sorted(set(x) | set(y)):
            if not _timing(key) and x.get(key) != y.get(key):
                out.append(f"step {x.get('step')}: {key} {x.get(key)!r} != {y.get(key)!r}")
    return out


def main() -> None:
    a, b = _rows(sys.argv[1]), _rows(sys.argv[2])
    diff = differences(a, b)
    print(f"{len(a)} rows, {sum(len(r) for r in a)} values; {len(diff)} differences")
    print("\n".join(diff[:20]))
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
