"""Rank faults under a real torchrun on CPU (gloo): a SIGTERM to one rank only, a kill -9 and a hang of one rank."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowgrove.parallel import faults
from flowgrove.runs.checkpoint import checkpoint_folders, choose_checkpoint

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.samples_per_prompt=1", "run.progress=false",
         "run.checkpoint_every=100", "eval.every=0"]  # run.parallel=auto: FSDP2 (a full fine-tune), sharded checkpoints
TIMEOUT = 8  # run.collective_timeout of the hang test: above the ranks' start-up skew on a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launcher: list[str], run: Path, steps: int, *extra: str, log: Path) -> subprocess.Popen:
    """One torchrun agent of `flowgrove train` in its own session (so a test can signal its whole group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "flowgrove", "train", "--steps", str(steps),
           "--out", str(run), *SMALL, *extra]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_rows(run: Path, rows: int, proc: subprocess.Popen, log: Path) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run ended or stalled before step {rows}: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def _worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the agent's workers, from their environment."""
    pids = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in pids:
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        ranks[int(env["RANK"])] = int(pid)
    return ranks


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def _wait_gone(pid: int, seconds: float) -> float | None:
    start = time.time()
    while time.time() - start < seconds:
        if _gone(pid):
            return time.time() - start
        time.sleep(0.05)
    return None


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path, dict[int, int]]:
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = torchrun(["--standalone", "--nproc-per-node", "2"], run, 60, *extra, log=log)
    _wait_rows(run, 2, proc, log)
    return proc, run, log, _worker_pids(proc.pid)


@pytest.mark.parametrize("target", ["rank 1", pytest.param("agent", marks=pytest.mark.slow)])
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_one_checkpoint(tmp_path, target):
    proc, run, log, ranks = _start(tmp_path)
    os.kill(ranks[1] if target == "rank 1" else proc.pid, signal.SIGTERM)  # the agent forwards it to every rank
    assert proc.wait(timeout=120) != 0
    out = log.read_text()
    stopped = [line for line in out.splitlines() if "stopped by signal after step" in line]
    assert len(stopped) == 2, out[-3000:]  # both ranks, after the same step
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert all(f"after step {step};" in line for line in stopped)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == step >= 2
    # step 1's checkpoint (always written) and the stop's: exactly one written by the stop
    assert sorted(p.name for p in checkpoint_folders(run)) == ["step_000001", f"step_{step:06d}"]
    assert choose_checkpoint(run).state.iteration == step  # what `--resume` takes
    assert "flowgrove/recipes/train.py" not in out and "flowgrove/training/trainer.py" not in out  # no worker traceback


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.slow)],
                         ids=["kill-9", "hung"])
def test_a_dead_or_hung_rank_ends_the_others_with_a_message_naming_it(tmp_path, sig):
    proc, run, log, ranks = _start(tmp_path, f"run.collective_timeout={TIMEOUT}")
    os.kill(ranks[1], sig)
    try:
        # kill -9: gloo sees the closed socket at once; hung: the collective times out. Either way the heartbeat
        # window (SILENT_AFTER) follows, and the agent's SIGTERM must not send rank 0 into a checkpoint.
        took = _wait_gone(ranks[0], TIMEOUT + faults.SILENT_AFTER + 20)
        assert took is not None, f"rank 0 still running: {log.read_text()[-3000:]}"
        print(f"rank 0 exited {took:.1f} s after rank 1 got signal {sig}")
        out = log.read_text()
        line = next((v for v in out.splitlines() if "stopped responding" in v), None)
        assert line is not None, out[-3000:]
        assert line.startswith("flowgrove: rank 0: rank 1 stopped responding (")
        assert "the last checkpoint is " in line and f"--resume {run}" in line
        assert [p.name for p in checkpoint_folders(run)] == ["step_000001"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a stopped rank 1 would keep the agent 30 s (its shutdown timeout)
        for pid in ranks.values():  # torchrun starts each worker in its own session: killpg misses them
            if not _gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()


# ---- in-process pieces ----------------------------------------------------------------------------------------

def test_failure_messages_name_the_silent_ranks_or_say_why_none_is_named():
    hint = "resume with `flowgrove train --resume runs/x`"
    failure = faults.PeerFailure(0, [1, 3], "Connection closed by peer\nmore")
    msg = faults.failure_message(failure, Path("c/step_2"), hint)
    assert msg == ("flowgrove: rank 0: ranks 1, 3 stopped responding (Connection closed by peer); "
                   "the last checkpoint is c/step_2; resume with `flowgrove train --resume runs/x`")
    assert "store is unreachable" in faults.failure_message(faults.PeerFailure(2, None, "x"), None, hint)
    alive = faults.failure_message(faults.PeerFailure(2, [], "Timed out"), None, hint)
    assert "every rank's heartbeat is alive" in alive and "no checkpoint was written yet" in alive


def test_fault_helpers_without_a_process_group():
    faults.barrier()
    assert faults.start_heartbeat(faults.Context(lambda: None, ""), 60) is None
    with pytest.raises(RuntimeError, match="own bug"), faults.peers_checked(None):
        raise RuntimeError("own bug")  # one process: nothing to blame on a peer
    assert faults.looks_like_collective_error(RuntimeError("[gloo/pair.cc:553] Connection closed by peer"))
    assert not faults.looks_like_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(ValueError, match="collective_timeout"):
        faults.collective_timeout(0)


def test_a_ctrl_c_forwarded_by_torchrun_counts_once_a_later_one_stops_at_once(monkeypatch):
    from flowgrove.recipes import train as runner

    stop = runner._Stop()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's
        os.kill(os.getpid(), signal.SIGINT)  # the agent's copy, milliseconds later
        assert stop.requested
        time.sleep(stop.SAME_PRESS + 0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        stop.restore()


def test_the_collective_timeout_replaces_the_timeout_of_an_existing_group(tmp_path):
    import torch
    import torch.distributed as dist

    from flowgrove.parallel import distributed

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        distributed.init_from_env(timeout=7)  # what build_trainer does on resume, once the saved config is read
        assert backend.options._timeout.total_seconds() == 7
    finally:
        dist.destroy_process_group()


def test_a_rank_whose_heartbeat_stands_still_is_named_and_a_live_or_finished_one_is_not():
    import threading

    import torch.distributed as dist

    store, done = dist.HashStore(), threading.Event()
    beats = [threading.Thread(target=faults._beat, args=(store, f"flowgrove/heartbeat/{r}", done, 0.05), daemon=True)
             for r in (0, 2)]  # rank 1 wrote nothing (died before its first beat); rank 3 stops after one beat
    store.set("flowgrove/heartbeat/3", "1")
    store.set("flowgrove/heartbeat/4", faults.DONE)  # rank 4 left the loop on its own
    for t in beats:
        t.start()
    try:
        beat = faults.Heartbeat(store, 0, 5, done, beats[0], faults.Context(lambda: None, ""))
        assert faults.silent_ranks(beat, window=0.3) == [1, 3]
    finally:
        done.set()


def test_the_watchdog_names_a_rank_only_after_its_counter_stood_still_long_enough():
    watch = faults.Watch(rank=0, world=4, silent_after=10.0, context=faults.Context(lambda: None, ""))
    assert watch.silent(["5", "7", None, "3"], now=100.0) == []  # first sight: nothing is old yet
    assert watch.silent(["6", "7", None, "4"], now=105.0) == []
    assert watch.silent(["7", "7", None, "5"], now=110.5) == [1]  # rank 2 never beat: not named by the watchdog
    assert watch.silent(["8", faults.DONE, None, "6"], now=120.0) == []  # rank 1 finished after all
    assert faults.silent_after(600) == 60 and faults.silent_after(8) == 4
