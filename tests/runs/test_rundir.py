"""A run folder belongs to one run: the lock, default names, --overwrite, and resume bookkeeping (config edits,
world size, wall time over resumes, TensorBoard steps, the checkpoint after step 1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from flowgrove.cli import main
from flowgrove.config.load import load_config
from flowgrove.recipes import train as runner
from flowgrove.runs import rundir
from flowgrove.runs.checkpoint import checkpoint_folders, write_state

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.samples_per_prompt=1", "run.progress=false"]


def cfg(steps: int, *extra: str):
    return load_config(None, [*SMALL, f"train.steps={steps}", *extra])


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run with checkpoint_every=100: its checkpoints come from step 1 and the end."""
    run = tmp_path_factory.mktemp("runs") / "two"
    runner.train(cfg(2, "run.checkpoint_every=100"), run)
    return run


@pytest.fixture
def run(two_steps, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(two_steps, copy)
    return copy


def steps_of(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def rows_of(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def test_the_first_step_is_checkpointed(two_steps):
    assert [p.name for p in checkpoint_folders(two_steps)] == ["step_000002", "step_000001"]


def test_the_lock_refuses_a_second_run_and_names_the_first(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    with rundir.RunLock(folder):
        assert (folder / rundir.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(FileExistsError, match=f"PID {os.getpid()}"):
            runner.train(cfg(1), folder)
        with pytest.raises(FileExistsError, match=f"PID {os.getpid()}"):
            rundir.RunLock(folder)
    assert not (folder / rundir.LOCK).exists()
    assert not (folder / "metrics.jsonl").exists()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    pid = os.fork()
    if pid == 0:  # the child takes the lock and waits to be killed
        rundir.RunLock(tmp_path)
        time.sleep(60)
        os._exit(0)
    deadline = time.time() + 20
    while not (tmp_path / rundir.LOCK).is_file() or not (tmp_path / rundir.LOCK).read_text().strip():
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(FileExistsError, match=f"PID {pid}"):
        rundir.RunLock(tmp_path)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    rundir.RunLock(tmp_path).release()


def test_default_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")  # every call in the same second
    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: next(suffixes))
    first = rundir.default_run_dir("dancegrpo", tmp_path)
    second = rundir.default_run_dir("dancegrpo", tmp_path)
    assert first.name == "dancegrpo-20260101-000000-aaaaaa" and second.name == "dancegrpo-20260101-000000-bbbbbb"
    assert first.is_dir() and second.is_dir()


def test_a_partial_run_without_a_checkpoint_needs_overwrite(tmp_path, capsys):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 9.0}) + "\n")
    (folder / "eval_before.json").write_text(json.dumps({"reward": 123.0}))
    (folder / "notes.txt").write_text("mine")
    assert main(["train", "--steps", "1", "--out", str(folder), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--out", str(folder), "--overwrite", *SMALL]) == 0
    assert steps_of(folder) == [1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["heldout_reward_before"] != 123.0
    assert (folder / "notes.txt").read_text() == "mine"  # only the files a run writes are removed


def test_overwrite_removes_every_file_the_earlier_run_wrote_and_nothing_else(run, capsys):
    assert {p.name for p in run.iterdir()} == set(rundir.RUN_FILES) - {"config.edited.yaml"}  # all a run writes
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--steps", "1", "--out", str(run), *SMALL]) == 2  # not without --overwrite
    err = capsys.readouterr().err
    assert "already holds a run with checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert steps_of(run) == [1, 2]
    assert main(["train", "--steps", "1", "--out", str(run), "--overwrite", *SMALL]) == 0
    assert "--overwrite: removed checkpoints, config.yaml, metrics.jsonl" in capsys.readouterr().err
    assert steps_of(run) == [1]
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 1]  # not appended
    assert sorted(p.name for p in (run / "eval_grids").iterdir()) == ["step_000000.png", "step_000001.png"]
    assert json.loads((run / "best.json").read_text())["step"] in (0, 1)
    assert [p.name for p in checkpoint_folders(run)] == ["step_000001"]
    assert (run / "notes.txt").read_text() == "mine"  # only the files a run writes are removed


def test_what_a_killed_run_left_half_written_is_removed_when_it_resumes(run, capsys):
    root = run / "checkpoints"
    shard = root / ".step_000003.tmp" / "dcp" / "__0_0.distcp"  # killed inside a checkpoint write
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"\0" * 1000)
    (root / ".best.tmp").mkdir()
    (root / ".step_000002.damaged").mkdir()
    for name in ("latest.tmp", "../config.yaml.tmp", "../metrics.jsonl.tmp", "../summary.json.tmp"):
        (root / name).write_text("half")
    (run / "mine.tmp").write_text("not a file a run writes")
    (run / rundir.LOCK).write_text("999999999\n")  # the lock file of a killed run: no process holds its flock
    runner.resume(run, steps=3)
    err = capsys.readouterr().err
    assert f"{run / rundir.LOCK} was left by PID 999999999, which is no longer running; taking it over" in err
    removed = [root / ".best.tmp", root / ".step_000002.damaged", root / ".step_000003.tmp", root / "latest.tmp",
               run / "config.yaml.tmp", run / "metrics.jsonl.tmp", run / "summary.json.tmp"]
    assert f"removed {', '.join(map(str, removed))}: left half-written by a run that was killed or failed" in err
    assert not any(p.exists() for p in removed) and not (run / rundir.LOCK).exists()
    assert (run / "mine.tmp").read_text() == "not a file a run writes"
    assert steps_of(run) == [1, 2, 3] and (root / "latest").read_text() == "step_000003"


def test_an_edited_run_config_is_reported_and_the_checkpoint_config_resumes(run, capsys):
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("lr: 0.0001", "lr: 0.5"))
    runner.resume(run, steps=3)
    err = capsys.readouterr().err
    assert "train.lr" in err and "checkpoint's config" in err and "config.edited.yaml" in err
    assert "lr: 0.5" in (run / "config.edited.yaml").read_text()
    resumed = (run / "checkpoints" / "step_000003" / "config.yaml").read_text()
    assert "lr: 0.0001" in resumed and "steps: 3" in resumed
    assert path.read_text() == resumed  # the folder's config is what ran, so the next resume reports nothing
    runner.resume(run, steps=4)
    assert "edited" not in capsys.readouterr().err


def test_a_resume_changes_the_keys_it_may_and_the_folder_keeps_them(run, capsys):
    from flowgrove.config.load import config_from_yaml_text

    def keep_of(path):
        return config_from_yaml_text(path.read_text()).run.keep_checkpoints

    runner.resume(run, steps=3, overrides=["run.keep_checkpoints=5"])
    root = run / "checkpoints"
    assert [p.name for p in checkpoint_folders(run)] == ["step_000003", "step_000002", "step_000001"]  # keep 5, not 2
    assert keep_of(run / "config.yaml") == keep_of(root / "step_000003" / "config.yaml") == 5
    assert "edited" not in capsys.readouterr().err
    # the folder's config is what the next resume takes these keys from (an earlier resume's value, or an edit)
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("keep_checkpoints: 5", "keep_checkpoints: 1").replace("lr: 0.0001", "lr: 0.5"))
    runner.resume(run, steps=4)
    err = capsys.readouterr().err
    assert f"taking run.keep_checkpoints from {path} (a resume may change them)" in err
    assert "edited after the run started (train.lr)" in err  # not a key a resume changes: ignored, as before
    assert [p.name for p in checkpoint_folders(run)] == ["step_000004"]
    resumed = config_from_yaml_text((root / "step_000004" / "config.yaml").read_text())
    assert resumed.run.keep_checkpoints == 1 and resumed.train.lr == 0.0001
    assert steps_of(run) == [1, 2, 3, 4]


def test_a_resume_refuses_keys_that_change_what_it_trains(run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["train", "--resume", str(run), "run.progress=false", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowgrove: config error: train.lr cannot change when a run resumes: it changes what the run "
                          "trains; start a new run with another --out for that (a resume may change: "
                          "reward_options.*.url, ") and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # refused before anything was touched


def test_resuming_with_another_world_size_is_a_note(run, capsys):
    state = run / "checkpoints" / "step_000002" / "state.json"
    data = json.loads(state.read_text())
    data["world_size"] = 2  # as if written by a run on two processes
    write_state(state.parent, data)
    runner.resume(run, steps=3)
    assert "step_000002 was written on 2 process(es), this resume has 1" in capsys.readouterr().err


def test_wall_seconds_count_the_whole_run_over_resumes(run):
    state = run / "checkpoints" / "step_000002" / "state.json"
    data = json.loads(state.read_text())
    assert 0 < data["wall_seconds"] < 600
    data["wall_seconds"] = 1000.0  # as if the run had trained for 1000 s before this resume
    write_state(state.parent, data)
    result = runner.resume(run, steps=3)
    assert 1000 < result.summary["wall_seconds"] < 1600
    assert json.loads((run / "summary.json").read_text())["wall_seconds"] == result.summary["wall_seconds"]


def test_resume_from_an_older_checkpoint_logs_each_step_once(run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner.resume(run, checkpoint="step_1")
    assert "removed" in capsys.readouterr().err  # step_2 of the abandoned future
    assert steps_of(run) == [1, 2]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2]


@pytest.mark.parametrize("name", ["dcp/__0_0.distcp", "dcp/.metadata", "state.json", "config.yaml"])
def test_a_corrupt_checkpoint_asked_for_is_one_line_and_exit_2(run, capsys, name):
    file = run / "checkpoints" / "step_000002" / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert main(["train", "--resume", str(run), "--checkpoint", "step_2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flowgrove: error: checkpoint file {file} ") and err.count("\n") == 1
    assert "--checkpoint step_N" in err


def test_a_corrupt_latest_falls_back_to_the_older_checkpoint_and_says_so(run, two_steps, capsys):
    file = run / "checkpoints" / "step_000002" / "dcp" / "__0_0.distcp"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10
    file.write_bytes(bytes(data))
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "skipping step_000002" in err and "taking" in err and "step_000001" in err
    assert rows_of(run) == rows_of(two_steps)  # step 2 trained again from step 1, to the same numbers
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_resume_without_a_checkpoint_points_to_overwrite(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
