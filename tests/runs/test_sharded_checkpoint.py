"""Sharded (DCP) checkpoints across real torchrun processes on gloo: FSDP2 shards of 2 and 4 ranks load back on 2
ranks and in one process; kill -9 of every process, then resume on 2 ranks and on 1; a half-written checkpoint is
skipped; a 4-rank run resumes on 2 ranks and on 1."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowgrove.runs import sharded

HERE = Path(__file__).parents[1]  # tests/, where the worker script lives
# The tiny policy is a full fine-tune: run.parallel=auto is FSDP2 on several ranks.
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.samples_per_prompt=1", "run.progress=false",
         "train.accumulate=transitions", "train.accumulate_size=100000", "train.micro_batch=100000",
         "eval.every=0"]  # checkpoints and resumes under test, not the periodic evaluation
STEPS = 5
# 2 ranks -> 1: the same global batch, summed in another order (two ranks' gradients reduced vs one sum), differs
# by float32 rounding: measured up to 1.2e-6 relative on values above 1e-2 (rewards, grad_norm); the loss (a mean of
# zero-mean advantages, about 1e-6: rounding noise itself) by up to 3.2e-6 absolute, approx_kl (1e-14) by less.
REL, ABS = 1e-5, 1e-5


def _env() -> dict:
    src = str(HERE.parent / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(HERE)])}


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _train(nproc: int, *args: str) -> list[str]:
    return _torchrun(nproc, "-m", "flowgrove", "train", *args)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if "rror" in line or "flowgrove:" in line][:8]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def _close(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Two metric tables with the same steps and keys, equal within REL/ABS; returns the largest relative
    difference of values above 1e-2 and the largest absolute difference."""
    assert [r["step"] for r in a] == [r["step"] for r in b] and all(x.keys() == y.keys() for x, y in zip(a, b))
    rel = absolute = 0.0
    for x, y in zip(a, b):
        for key, value in x.items():
            if not (isinstance(value, float) and math.isfinite(value)):
                assert value == y[key], (x["step"], key)
                continue
            assert math.isclose(value, y[key], rel_tol=REL, abs_tol=ABS), (x["step"], key, value, y[key])
            absolute = max(absolute, abs(value - y[key]))
            rel = max(rel, abs(value - y[key]) / abs(value)) if abs(value) > 1e-2 else rel
    return rel, absolute


def _load_in_one_process(out: Path) -> None:
    """What a 1-rank resume and `flowgrove export` do with a sharded folder, without a process group."""
    from dcp_fsdp_worker import build, snapshot

    expected = load_file(str(out / "expected.safetensors"))
    one = build(shard=False, seed=1)  # a plain module, other weights, no optimizer state yet
    sharded.load(one, out / "dcp")
    loaded = snapshot(one)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    for part, key in (("ema", "ema"), ("model", "param")):  # what `flowgrove export` reads
        export = build(shard=False, seed=2).module
        sharded.load_full(export, out / "dcp", part)
        assert all(torch.equal(p, expected[f"{key}/{n}"]) for n, p in export.named_parameters() if p.requires_grad)
    assert "model.0.bias" not in sharded.read_metadata(out / "dcp").state_dict_metadata  # frozen: not saved
    assert torch.equal(one.module[0].bias, build(shard=False, seed=1).module[0].bias)


def test_fsdp2_shards_load_back_on_two_ranks_and_in_one_process(tmp_path):
    _run(_torchrun(2, str(HERE / "dcp_fsdp_worker.py"), str(tmp_path), "save"))
    assert (tmp_path / "save_2.txt").read_text() == "same=True sharded=True"
    assert sharded.shard_files(tmp_path / "dcp") == {"__0_0.distcp", "__1_0.distcp"}
    assert sharded.stored_parts(tmp_path / "dcp") == {"model", "optim", "ema", "reference"}
    _load_in_one_process(tmp_path)


@pytest.mark.slow
def test_fsdp2_shards_of_four_ranks_load_on_two_and_on_one(tmp_path):
    _run(_torchrun(4, str(HERE / "dcp_fsdp_worker.py"), str(tmp_path), "save"))  # Linear(8, 5): uneven shards
    assert (tmp_path / "save_4.txt").read_text() == "same=True sharded=True"
    assert len(sharded.shard_files(tmp_path / "dcp")) == 4
    _run(_torchrun(2, str(HERE / "dcp_fsdp_worker.py"), str(tmp_path), "load"))
    assert (tmp_path / "load_2.txt").read_text() == "same=True sharded=True"
    _load_in_one_process(tmp_path)


def _start_and_kill_all(run: Path, after_rows: int) -> int:
    """A 2-rank run killed with SIGKILL (the agent and both workers) once ``after_rows`` steps are logged."""
    proc = subprocess.Popen(_train(2, "--steps", str(STEPS), "--out", str(run), *SMALL, "run.checkpoint_every=1"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = run / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_rows):
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    pids = _process_tree(proc.pid)  # torchrun starts each worker in a session of its own: kill each process
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert len(pids) == 3 and not any(_alive(pid) for pid in pids), pids  # the agent and both workers are gone
    return len(metrics.read_text().splitlines())


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += _process_tree(int(child))
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
def test_kill9_of_every_rank_resumes_on_two_ranks_and_on_one(tmp_path, capfd):
    from flowgrove.recipes import train as runner

    full, killed, one = tmp_path / "full", tmp_path / "killed", tmp_path / "one"
    _run(_train(2, "--steps", str(STEPS), "--out", str(full), *SMALL))
    done = _start_and_kill_all(killed, after_rows=3)
    assert done < STEPS, "the run finished before the kill; nothing was tested"
    steps = sorted((killed / "checkpoints").glob("step_*"))
    assert len(steps) >= 2 and json.loads((steps[-1] / "state.json").read_text())["world_size"] == 2
    assert sharded.shard_files(steps[0] / "dcp") == {"__0_0.distcp", "__1_0.distcp"}  # FSDP2: a shard per rank
    shutil.copytree(killed, one)
    _run(_train(2, "--resume", str(killed)))
    assert _rows(killed) == _rows(full)  # 2 -> 2: exactly the uninterrupted run

    # 2 -> 1, with the newest checkpoint half-written (rank 1's shard lost): the one before it is taken
    newest = sorted((one / "checkpoints").glob("step_*"))[-1]
    (newest / "dcp" / "__1_0.distcp").unlink()
    capfd.readouterr()
    runner.resume(one)
    err = capfd.readouterr().err
    assert f"skipping {newest.name}" in err and "__1_0.distcp is missing" in err and "taking" in err
    assert "written on 2 process(es), this resume has 1" in err
    rel, absolute = _close(_rows(one), _rows(full))
    print(f"2 -> 1 ranks: metrics differ by at most {rel:.1e} relative (values above 1e-2), {absolute:.1e} absolute")


@pytest.mark.slow
def test_a_four_rank_run_resumes_on_two_ranks_and_on_one(tmp_path):
    from flowgrove.recipes import train as runner

    four = tmp_path / "four"
    _run(_train(4, "--steps", "4", "--out", str(four), *SMALL, "run.checkpoint_every=1", "run.keep_checkpoints=10",
                "run.parallel=ddp"))  # DDP here (replicated tensors, deduplicated by DCP), FSDP2 in the kill test
    runs = {n: tmp_path / f"on{n}" for n in (2, 1)}
    for run in runs.values():
        shutil.copytree(four, run)
    _run(_train(2, "--resume", str(runs[2]), "--checkpoint", "step_2"))
    runner.resume(runs[1], checkpoint="step_2")
    # model_calls_per_sample counts the model calls of each rank's share of the batch: it depends on the split
    drop = lambda rows: [{k: v for k, v in r.items() if k != "model_calls_per_sample"} for r in rows]  # noqa: E731
    for n, run in runs.items():
        assert _rows(run)[:2] == _rows(four)[:2]  # the steps before the checkpoint, kept as they were
        rel, absolute = _close(drop(_rows(run)), drop(_rows(four)))
        print(f"4 -> {n} ranks: metrics differ by at most {rel:.1e} relative (values above 1e-2), {absolute:.1e} absolute")
