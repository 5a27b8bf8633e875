"""Kill a real `flowgrove train` subprocess, resume it, and compare with the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.samples_per_prompt=1", "run.progress=false"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowgrove", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def _start_and_kill(run: Path, sig: int, after_steps: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(_cli("train", "--steps", "6", "--out", str(run), *SMALL, *extra), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps:
            break
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, sig):
    full = tmp_path / "full"
    subprocess.run(_cli("train", "--steps", "6", "--out", str(full), *SMALL), env=_env(), check=True, capture_output=True)
    killed = tmp_path / "killed"
    # SIGKILL: nothing runs after the kill, so checkpoint every step; SIGTERM writes its own checkpoint.
    every = "run.checkpoint_every=1" if sig == signal.SIGKILL else "run.checkpoint_every=100"
    proc = _start_and_kill(killed, sig, 2, every)
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "latest").is_file()
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert done < 6, "the run finished before the kill; nothing was tested"
    subprocess.run(_cli("train", "--resume", str(killed)), env=_env(), check=True, capture_output=True)
    assert _rows(killed) == _rows(full)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["heldout_reward_after"] == b["heldout_reward_after"]
    assert a["heldout_reward_before"] == b["heldout_reward_before"]
