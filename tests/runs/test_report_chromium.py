"""report.html in a real browser: headless Chromium opens it and every inline image decodes.

The report's own inline script writes ``data-images="<count>/<decoded>"`` (images with ``naturalWidth > 0``) onto
its body at the load event; ``--dump-dom`` returns the DOM after the scripts ran. Skipped with a reason where no
Chromium is installed (``.ci/run`` installs Debian's ``chromium`` when it is absent).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from flowgrove.runs.metrics import save_grid
from flowgrove.runs.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    found = next((b for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("no headless Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def _run_dir(tmp_path):
    """A run folder as a run with ``eval.every=2`` and ``eval.hybrid_steps`` leaves it (three evaluations)."""
    run = tmp_path / "run"
    (run / "eval_grids" / "hybrid").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    evals = []
    for step in (0, 2, 4):
        for folder in (run / "eval_grids", run / "eval_grids" / "hybrid"):
            save_grid(torch.rand(4, 3, 8, 8, generator=gen), folder / f"step_{step:06d}.png", columns=2)
        numbers = {"eval/reward": 0.8 + step / 100, "eval/judge/digit_classifier": 0.9 - step / 10,
                   "eval/diversity_ratio": 1 - step / 10, "eval/mmd2": step / 100, "eval/kl": step / 10,
                   "eval/hybrid/reward": 0.8 + step / 200, "eval/hybrid/mmd2": step / 200}
        evals.append({"step": step, **numbers, "alarms": ["judge digit_classifier fell"] if step else []})
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    train = [{"step": s, "reward_mean": 0.5 + s / 10} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (run / "config.yaml").write_text("eval:\n  every: 2\n  hybrid_steps: 2\n")
    return run


def _chromium(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_renders_its_images_in_headless_chromium(tmp_path):
    browser = _browser()
    report = write_report(_run_dir(tmp_path))
    dom = _chromium(browser, tmp_path, "--dump-dom", report.as_uri()).stdout
    shown = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert shown, dom[:300]
    # 4 curve plots (rewards, diversity, MMD^2, KL) + 6 grids (3 steps, the policy and hybrid inference)
    total, decoded = int(shown.group(1)), int(shown.group(2))
    assert total == decoded == 10, shown.group(0)
    assert "step_000004 hybrid" in dom and "judge digit_classifier fell" in dom


def test_report_screenshot_is_drawn(tmp_path):
    browser = _browser()
    report = write_report(_run_dir(tmp_path))
    shot = tmp_path / "shot.png"
    _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1100,900", report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000  # a blank page is a few KB
