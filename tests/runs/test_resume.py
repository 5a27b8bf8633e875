"""Kill a real `flowgrove train` subprocess, resume it, and compare with the uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowgrove.messages import program
from flowgrove.training import setup as trainer_setup

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.samples_per_prompt=1", "run.progress=false",
         "eval.every=0"]  # these tests count reward calls and steps: no periodic evaluation


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


# ---- in-process: halted training, Ctrl-C, and twenty SIGKILLs ---------------------------------------------

def _cfg(steps: int, *extra: str):
    from flowgrove.config.load import load_config

    return load_config(None, [*SMALL, f"train.steps={steps}", *extra])


def _summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in s.items() if k.startswith("heldout") or k == "steps"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run."""
    from flowgrove.recipes import train as runner

    run = tmp_path_factory.mktemp("ref") / "full"
    runner.train(_cfg(4), run)
    return run


def _boldness_hook(monkeypatch, at_step: int, action) -> None:
    """Apply ``action(rewards)`` to the boldness reward of training step ``at_step`` (call 0 is eval_before)."""

    real, calls = trainer_setup.build_reward, [0]

    def build(name, **kwargs):
        fn = real(name, **kwargs)
        if name != "boldness":
            return fn

        def reward(images, prompts):
            out = fn(images, prompts)
            calls[0] += 1
            return action(out) if calls[0] - 1 == at_step else out

        return reward

    monkeypatch.setattr(trainer_setup, "build_reward", build)


def _saved_steps(monkeypatch) -> list[int]:
    from flowgrove.recipes import train as runner

    saved, real = [], runner.save_checkpoint

    def save(trainer, *args, **kwargs):
        saved.append(trainer.iteration)
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(runner, "save_checkpoint", save)
    return saved


@pytest.mark.parametrize("every", [100, 1])
def test_a_nan_reward_halts_with_a_checkpoint_of_the_last_good_state(tmp_path, monkeypatch, reference, every):
    from flowgrove.recipes import train as runner

    run = tmp_path / "halted"
    saved = _saved_steps(monkeypatch)
    _boldness_hook(monkeypatch, 3, lambda r: r * float("nan"))
    with pytest.raises(SystemExit) as err:
        runner.train(_cfg(4, f"run.checkpoint_every={every}"), run)
    message = str(err.value)
    ckpt = run / "checkpoints" / "step_000002"
    assert message.startswith("flowgrove: reward(s) ['boldness'] returned NaN/inf at step 3")
    assert f"the last good state is checkpoint {ckpt}" in message and f"--resume {run}" in message
    assert "\n" not in message
    assert saved == [1, 2]  # step 2 once: by the halt (every=100) or by the loop (every=1), never both
    monkeypatch.undo()
    runner.resume(run)
    assert _rows(run) == _rows(reference) and _summary(run) == _summary(reference)


@pytest.mark.parametrize("every", [100, 1])
def test_a_reward_that_raises_checkpoints_the_last_completed_step_and_resumes(tmp_path, monkeypatch, reference, every):
    import torch
    from safetensors.torch import load_file

    from flowgrove.recipes import train as runner

    run, rng = tmp_path / "failed", []

    def crash(r):  # a reward that draws from the global RNG, then fails: the draw must not reach the checkpoint
        rng.append(torch.get_rng_state())
        torch.rand(1000)
        raise RuntimeError("the reward model ran out of memory.")

    saved = _saved_steps(monkeypatch)
    _boldness_hook(monkeypatch, 3, crash)
    with pytest.raises(runner.RunStopped) as err:
        runner.train(_cfg(4, f"run.checkpoint_every={every}"), run)
    ckpt = run / "checkpoints" / "step_000002"
    assert str(err.value) == (
        "reward 'boldness' failed (RuntimeError: the reward model ran out of memory) at step 3; the step was skipped "
        f"and no weights changed; the last good state is checkpoint {ckpt}; resume with `{program()} train --resume "
        f"{run}` (for a reward server that moved, add reward_options.boldness.url=URL to it)")
    assert saved == [1, 2] and (run / "checkpoints" / "latest").read_text() == "step_000002"
    assert torch.equal(load_file(str(ckpt / "rng.safetensors"))["torch_rng"], rng[0])
    monkeypatch.undo()
    runner.resume(run)
    assert _rows(run) == _rows(reference) and _summary(run) == _summary(reference)


@pytest.fixture(scope="module")
def reward_server():
    """A real `serve-reward` server of brightness whose call number ``state["at"]`` answers ``state["answer"]``
    instead (call 0 is the evaluation before training, call k training step k)."""
    from test_rewards_http import serving

    from flowgrove.rewards.server import make_server

    state = {"calls": 0, "at": None, "answer": None}
    with serving(make_server(_served_brightness(state), "brightness")) as url:
        yield url, state


def _served_brightness(state: dict):
    """Brightness, except that call number ``state["at"]`` answers ``state["answer"](images)``."""
    from flowgrove.rewards import build_reward

    brightness = build_reward("brightness")

    def served(images, prompts):
        call, state["calls"] = state["calls"], state["calls"] + 1
        return state["answer"](images) if call == state["at"] else brightness(images, prompts)

    return served


def _remote(url: str) -> list[str]:
    return ["rewards={remote: 1.0}", f"reward_options.remote.url={url}", "reward_options.remote.retries=0"]


@pytest.fixture(scope="module")
def remote_reference(tmp_path_factory, reward_server) -> Path:
    """An uninterrupted 4-step run scored by the reward server."""
    from flowgrove.recipes import train as runner

    url, state = reward_server
    state.update(calls=0, at=None)
    run = tmp_path_factory.mktemp("remote") / "full"
    runner.train(_cfg(4, *_remote(url)), run)
    return run


def _out_of_memory(images):
    raise RuntimeError("CUDA out of memory")


def test_a_reward_server_failing_mid_run_is_one_line_exit_2_and_resumes(tmp_path, capsys, reward_server,
                                                                       remote_reference):
    from flowgrove.cli import main

    url, state = reward_server
    state.update(calls=0, at=3, answer=_out_of_memory)  # HTTP 500 at training step 3
    run = tmp_path / "run"
    assert main(["train", "--steps", "4", "--out", str(run), *SMALL, *_remote(url)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"flowgrove: error: reward 'remote' failed (RewardServerError: {url}/score gave HTTP 500: "
                               "reward 'brightness' raised RuntimeError: CUDA out of memory after 1 attempt(s)")
    assert (f"at step 3; the step was skipped and no weights changed; the last good state is checkpoint "
            f"{run / 'checkpoints' / 'step_000002'}; resume with `{program()} train --resume {run}`") in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    assert main(["train", "--resume", str(run)]) == 0  # the server answers again
    assert _rows(run) == _rows(remote_reference) and _summary(run) == _summary(remote_reference)


def test_a_reward_server_failing_in_the_periodic_evaluation_keeps_the_step_it_follows(tmp_path, capsys, reward_server):
    from flowgrove.cli import main

    url, state = reward_server
    periodic = [*SMALL, "eval.every=2", *_remote(url)]
    state.update(calls=0, at=None)
    assert main(["train", "--steps", "4", "--out", str(tmp_path / "full"), *periodic]) == 0
    state.update(calls=0, at=4, answer=_out_of_memory)  # 0, 1 before training (held-out, guard), 2, 3 the steps
    run = tmp_path / "run"
    assert main(["train", "--steps", "4", "--out", str(run), *periodic]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"flowgrove: error: reward 'remote' failed (RewardServerError: {url}/score gave "
                               "HTTP 500")
    assert (f"in the held-out evaluation after step 2; the step's training is kept; the last good state is checkpoint "
            f"{run / 'checkpoints' / 'step_000002'}; resume with `{program()} train --resume {run}`") in lines[0]
    assert [r["step"] for r in _rows(run)] == [1, 2]  # the step the evaluation followed is logged
    assert main(["train", "--resume", str(run)]) == 0  # the server answers again
    train_keys = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("eval/", "guard/"))} for r in rows]  # noqa: E731
    assert train_keys(_rows(run)) == train_keys(_rows(tmp_path / "full"))
    assert _summary(run) == _summary(tmp_path / "full")
    state.update(calls=0, at=0)  # before the first step: nothing trained, the same one line and exit code
    assert main(["train", "--steps", "4", "--out", str(tmp_path / "early"), *periodic]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("flowgrove: error: reward 'remote' failed") and line.endswith("in the held-out evaluation")
    assert "\n" not in line


def test_a_resume_continues_against_a_reward_server_that_moved(tmp_path, capsys, reward_server, remote_reference):
    from test_rewards_http import serving

    from flowgrove.cli import main
    from flowgrove.config.load import config_from_yaml_text
    from flowgrove.rewards.server import make_server

    moved, state = reward_server
    state.update(calls=0, at=3, answer=_out_of_memory)
    run = tmp_path / "run"
    with serving(make_server(_served_brightness(state), "brightness")) as first:  # fails at step 3, then goes away
        assert main(["train", "--steps", "4", "--out", str(run), *SMALL, *_remote(first)]) == 2
    assert "reward_options.remote.url=URL" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 2  # the old URL: nothing answers there any more
    assert f"no reward server answers at {first}/health" in capsys.readouterr().err
    state.update(at=None)
    assert main(["train", "--resume", str(run), f"reward_options.remote.url={moved}"]) == 0
    assert _rows(run) == _rows(remote_reference) and _summary(run) == _summary(remote_reference)
    for config in (run / "config.yaml", run / "checkpoints" / "step_000004" / "config.yaml"):
        assert config_from_yaml_text(config.read_text()).reward_options["remote"]["url"] == moved


def test_a_nan_from_a_reward_server_takes_the_nan_reward_path(tmp_path, reward_server, remote_reference):
    import torch

    from flowgrove.recipes import train as runner

    url, state = reward_server
    state.update(calls=0, at=3, answer=lambda images: torch.full((images.shape[0],), float("nan")))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        runner.train(_cfg(4, *_remote(url)), run)
    assert str(err.value).startswith("flowgrove: reward(s) ['remote'] returned NaN/inf at step 3")
    assert f"the last good state is checkpoint {run / 'checkpoints' / 'step_000002'}" in str(err.value)
    runner.resume(run)
    assert _rows(run) == _rows(remote_reference) and _summary(run) == _summary(remote_reference)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes(tmp_path, monkeypatch, capfd, reference):
    from flowgrove.recipes import train as runner

    run = tmp_path / "interrupted"
    _boldness_hook(monkeypatch, 2, lambda r: (os.kill(os.getpid(), signal.SIGINT), r)[1])
    with pytest.raises(SystemExit, match="stopped by signal after step 2"):
        runner.train(_cfg(4, "run.checkpoint_every=100"), run)
    err = capfd.readouterr().err
    assert err.count("stopping after the current step and writing a checkpoint") == 1
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    monkeypatch.undo()
    runner.resume(run)
    assert _rows(run) == _rows(reference) and _summary(run) == _summary(reference)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, reference):
    from flowgrove.recipes import train as runner
    from flowgrove.runs.checkpoint import choose_checkpoint

    run = tmp_path / "interrupted"

    def two_interrupts(r):  # rewards are scored in worker threads: give the main thread time to take each signal
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return r

    _boldness_hook(monkeypatch, 2, two_interrupts)
    with pytest.raises(KeyboardInterrupt):
        runner.train(_cfg(4, "run.checkpoint_every=100"), run)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert choose_checkpoint(run).state.iteration == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    runner.resume(run)
    assert _rows(run) == _rows(reference) and _summary(run) == _summary(reference)


def _disk_full_in(monkeypatch, step: int) -> list[Path]:
    """Checkpoint ``step``'s shard file runs out of space after its first 4 KiB, inside torch's DCP writer (the
    error DCP wraps in its CheckpointException); returns the shard file it left."""
    from torch.distributed.checkpoint import filesystem

    from flowgrove.runs.checkpoint import checkpoint_name

    real, partial = filesystem._write_item, []

    def write(transforms, stream, *args, **kwargs):
        if checkpoint_name(step) not in str(stream.name):
            return real(transforms, stream, *args, **kwargs)
        stream.write(b"\0" * 4096)
        stream.flush()
        partial.append(Path(stream.name))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem, "_write_item", write)
    return partial


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch, capsys,
                                                                                       reference):
    from flowgrove.cli import main
    from flowgrove.recipes import train as runner
    from flowgrove.runs.checkpoint import checkpoint_folders, verify_checkpoint

    run = tmp_path / "full"
    partial = _disk_full_in(monkeypatch, 4)  # checkpoints after step 1, 2 and 4: the last one fails
    assert main(["train", "--steps", "4", "--out", str(run), *SMALL, "run.checkpoint_every=2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    root = run / "checkpoints"
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith(f"flowgrove: error: cannot write checkpoint {root / 'step_000004'} (No space left on "
                               "device); its partial files were removed")
    assert f"the last checkpoint is {root / 'step_000002'}; free disk space there" in lines[0]
    assert lines[0].endswith(f"train --resume {run}`")
    assert partial and partial[0].parent.parent == root / ".step_000004.tmp"  # it was there, half written
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert (root / "latest").read_text() == "step_000002"
    verify_checkpoint(checkpoint_folders(run)[0])
    monkeypatch.undo()
    runner.resume(run)
    assert _rows(run) == _rows(reference) and _summary(run) == _summary(reference)


def _child(run: Path, steps: int, slow_writes: bool) -> None:
    """A forked training process: resume ``run``, or start it afresh when it has no checkpoint yet."""
    code = 1
    try:
        from flowgrove.recipes import train as runner
        from flowgrove.runs import checkpoint

        if slow_writes:  # widen the checkpoint-write window, so that random kills land inside it too
            real = checkpoint._write
            checkpoint._write = lambda folder, name, writer: (time.sleep(0.05), real(folder, name, writer))[1]
        try:
            runner.resume(run)
        except FileNotFoundError:
            runner.train(_cfg(steps, "run.checkpoint_every=1"), run, overwrite=True)
        code = 0
    finally:
        os._exit(code)


def _latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    text = latest.read_text().strip() if latest.is_file() else ""
    return int(text[5:]) if text.startswith("step_") else 0


def _writing_since(run: Path, start_ns: int) -> bool:
    """A checkpoint write (a temporary folder) begun after ``start_ns``."""
    for tmp in (run / "checkpoints").glob(".step_*.tmp"):
        try:
            if tmp.stat().st_mtime_ns >= start_ns:
                return True
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return False


def _wait(pid: int, seconds: float, until=lambda: False) -> int | None:
    """The exit status of ``pid`` if it ends within ``seconds`` (or before ``until()`` holds), else None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    return None


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_resume_to_the_uninterrupted_run(tmp_path):
    # Training processes are forked from this one (imports done once) and killed with SIGKILL at moments drawn
    # from a seeded RNG, a random delay after one of three events: the process start (startup, evaluation, the
    # first step), its first finished checkpoint (the next step, its write), or the start of a checkpoint write
    # (slowed down, so the kill lands inside it; the next process trains that step again and writes it again).
    # A last process runs to the end without a kill.
    import random

    from flowgrove.recipes import train as runner

    steps = 12
    full = tmp_path / "full"
    runner.train(_cfg(steps, "run.checkpoint_every=1"), full)
    run, rng = tmp_path / "killed", random.Random(7)
    in_write, at_steps, events = 0, [], []
    for _ in range(20):
        start, start_ns, event = _latest_step(run), time.time_ns(), rng.choice(["start", "checkpoint", "write"])
        until = {"start": lambda: True, "checkpoint": lambda: _latest_step(run) > start,
                 "write": lambda: _writing_since(run, start_ns)}[event]
        pid = os.fork()
        if pid == 0:
            _child(run, steps, slow_writes=True)
        assert _wait(pid, 60, until) is None, "a child ended before its kill"
        assert _wait(pid, rng.uniform(0.0, 0.6 if event != "write" else 0.2)) is None, "a child ended before its kill"
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        in_write += event == "write" and _writing_since(run, start_ns)
        at_steps.append(_latest_step(run))
        events.append(event)
    pid = os.fork()
    if pid == 0:
        _child(run, steps, slow_writes=False)
    assert _wait(pid, 120) == 0
    assert in_write >= events.count("write") // 2 >= 2 and len(set(at_steps)) >= 4, (in_write, events, at_steps)
    assert max(at_steps) < steps, "the run was complete before the last kill; fewer moments were tested"
    assert _rows(run) == _rows(full) and _summary(run) == _summary(full)


def test_adamw8bit_halts_and_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """torchao's AdamW8bit: DCP writes its 8-bit moments as their float32 values, and a load quantises them back to
    the same codes, so a resumed run equals the uninterrupted one. (torchao compiles its step per parameter shape,
    minutes on the CPU with inductor's C++ build: the test traces the same step with dynamo's eager backend, in
    every run.)"""
    pytest.importorskip("torchao")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **{**kwargs, "backend": "eager"}))
    from flowgrove.recipes import train as runner

    full, run = tmp_path / "full", tmp_path / "halted"
    runner.train(_cfg(4, "train.optimizer=adamw8bit"), full)
    optimizers, real_build = [], trainer_setup.build_parts

    def build_parts(*args):
        parts = real_build(*args)
        optimizers.append(parts.optimizer)
        return parts

    with monkeypatch.context() as patch:  # a NaN reward at step 3 halts the run with a checkpoint of step 2
        patch.setattr(trainer_setup, "build_parts", build_parts)
        _boldness_hook(patch, 3, lambda r: r * float("nan"))
        with pytest.raises(SystemExit):
            runner.train(_cfg(4, "train.optimizer=adamw8bit"), run)
    assert any(type(v).__name__ == "OptimState8bit" for state in optimizers[0].state.values() for v in state.values())
    runner.resume(run)
    assert _rows(run) == _rows(full) and _summary(run) == _summary(full)
