"""Checkpoint folders: sha256 of every file, the newest-intact fallback, a step is never saved twice, and a crash
at any file-system step of a save leaves an intact checkpoint at least as new as before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from flowgrove.config.load import config_to_yaml, load_config
from flowgrove.runs import checkpoint as ck
from flowgrove.runs.checkpoint import CheckpointError, choose_checkpoint, save_checkpoint, verify_checkpoint
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy, brightness, restore_checkpoint

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000", "rewards={brightness: 1.0}",
         "train.ema_decay=0.9"]


def make() -> GRPOTrainer:
    cfg = load_config(None, SMALL)
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, ["zero", "one", "two"])


def trained_run(run, steps: int, keep: int = 2) -> GRPOTrainer:
    """A trainer after ``steps`` steps, each checkpointed into ``run``."""
    trainer = make()
    for _ in range(steps):
        trainer.step()
        save_checkpoint(trainer.state(), run, config_to_yaml(trainer.cfg), keep=keep)
    return trainer


def step_dir(run, n: int):
    return run / "checkpoints" / f"step_{n:06d}"


def test_state_json_holds_the_sha256_of_every_file_and_loads_back(tmp_path):
    trainer = trained_run(tmp_path, 2)
    folder = step_dir(tmp_path, 2)
    state = json.loads((folder / "state.json").read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"state.json"}
    assert set(state["files"]) == on_disk == {"dcp/.metadata", "dcp/__0_0.distcp", "rng.safetensors", "config.yaml"}
    assert ck.sharded.stored_parts(folder / "dcp") == {"model", "optim", "ema"}
    for name, digest in state["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert state["iteration"] == 2 and state["world_size"] == 1
    fresh = make()
    restore_checkpoint(fresh, folder)
    assert fresh.iteration == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, trainer.params))
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema, trainer.ema))
    a, b = fresh.step(), trainer.step()  # optimizer moments and generators restored too
    assert {k: v for k, v in a.items() if not k.startswith("seconds")} == {k: v for k, v in b.items() if not k.startswith("seconds")}


def _flip_byte(path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # inside the tensor data, after the header: safetensors itself loads this fine
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_file_is_detected_and_skipped(tmp_path):
    trained_run(tmp_path, 2)
    bad = step_dir(tmp_path, 2) / "dcp" / "__0_0.distcp"
    _flip_byte(bad)
    with pytest.raises(CheckpointError, match="__0_0.distcp") as err:
        restore_checkpoint(make(), step_dir(tmp_path, 2))
    assert "\n" not in str(err.value) and "--checkpoint step_N" in str(err.value)
    choice = choose_checkpoint(tmp_path)
    assert choice.path == step_dir(tmp_path, 1)
    assert any("skipping step_000002" in n for n in choice.notes)
    assert "taking" in choice.notes[-1] and "step_000001" in choice.notes[-1]
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        choose_checkpoint(tmp_path, "step_2")  # asked for explicitly: an error, not a fallback


@pytest.mark.parametrize("name", ["dcp/__0_0.distcp", "dcp/.metadata", "state.json", "config.yaml", "rng.safetensors"])
def test_a_truncated_file_is_a_one_line_error_naming_it(tmp_path, name):
    trained_run(tmp_path, 1)
    file = step_dir(tmp_path, 1) / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        choose_checkpoint(tmp_path, "step_000001")
    message = str(err.value)
    assert str(file) in message and "\n" not in message
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        choose_checkpoint(tmp_path)  # the only checkpoint is damaged: nothing to fall back to


def test_an_unknown_checkpoint_name_lists_the_existing_ones(tmp_path):
    trained_run(tmp_path, 2)
    with pytest.raises(CheckpointError, match="step_000002, step_000001"):
        choose_checkpoint(tmp_path, "step_7")


@pytest.mark.parametrize("pointer", [None, "step_000009", "\x00garbage", "step_000001"])
def test_a_missing_dangling_or_stale_latest_falls_back_to_the_newest_intact(tmp_path, pointer):
    trained_run(tmp_path, 2)
    latest = tmp_path / "checkpoints" / "latest"
    assert choose_checkpoint(tmp_path).notes == ()
    latest.unlink()
    if pointer is not None:
        latest.write_text(pointer)
    choice = choose_checkpoint(tmp_path)
    assert choice.path == step_dir(tmp_path, 2) and choice.state.iteration == 2
    assert "latest" in choice.notes[0] and "step_000002" in choice.notes[-1]


def test_saving_a_step_twice_keeps_the_first_copy(tmp_path):
    trainer = trained_run(tmp_path, 1)
    files = {p: p.stat().st_ino for p in step_dir(tmp_path, 1).rglob("*")}
    with torch.no_grad():
        trainer.params[0].add_(1.0)  # a second save of step 1 would write these weights
    save_checkpoint(trainer.state(), tmp_path, config_to_yaml(trainer.cfg))
    assert {p: p.stat().st_ino for p in step_dir(tmp_path, 1).rglob("*")} == files
    verify_checkpoint(step_dir(tmp_path, 1))


def test_only_the_newest_checkpoints_and_no_leftovers_stay(tmp_path):
    (tmp_path / "checkpoints" / ".step_000009.tmp").mkdir(parents=True)
    trained_run(tmp_path, 4, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000004"]


class _Crash(BaseException):  # a kill: nothing of flowgrove runs after it
    pass


def _crash_at(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th file-system change of checkpoint.py raise (n = 0: none); returns the change counter."""
    count = [0]

    def hook(real):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                raise _Crash
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ck.os, "replace", hook(os.replace))
    monkeypatch.setattr(ck.shutil, "rmtree", hook(shutil.rmtree))
    monkeypatch.setattr(ck, "_write", hook(ck._write))
    monkeypatch.setattr(ck, "atomic_write_text", hook(ck.atomic_write_text))
    return count


@pytest.mark.parametrize("case", ["new step", "same step again", "over a damaged copy"])
def test_a_crash_at_any_point_of_a_save_leaves_an_intact_checkpoint(tmp_path, monkeypatch, case):
    base = tmp_path / "base"
    trainer = trained_run(base, 2, keep=1)  # keep=1: pruning too early would leave nothing
    if case == "new step":
        trainer.step()
    elif case == "over a damaged copy":
        trainer.step()
        save_checkpoint(trainer.state(), base, config_to_yaml(trainer.cfg), keep=2)
        _flip_byte(step_dir(base, 3) / "dcp" / "__0_0.distcp")
    n_changes = None
    for n in range(0, 40):
        run = tmp_path / f"crash{n}"
        shutil.copytree(base, run)
        with monkeypatch.context() as m:
            count = _crash_at(m, n)
            try:
                save_checkpoint(trainer.state(), run, config_to_yaml(trainer.cfg), keep=1)
            except _Crash:
                pass
            else:
                n_changes = count[0]
        choice = choose_checkpoint(run)
        verify_checkpoint(choice.path)
        assert choice.state.iteration >= 2, f"crash at change {n}"  # never older than before the save
        if n_changes is not None and n > n_changes:
            assert choice.state.iteration == trainer.iteration
            break
    assert n_changes, "the save made no file-system changes"


def test_a_shard_the_metadata_names_must_be_listed_in_state_json(tmp_path):
    trained_run(tmp_path, 2)
    folder = step_dir(tmp_path, 2)
    state = json.loads((folder / "state.json").read_text())
    del state["files"]["dcp/__0_0.distcp"]  # as if rank 0 had listed the folder before a shard was complete
    ck.write_state(folder, state)
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing .its DCP metadata names it"):
        verify_checkpoint(folder)
    assert choose_checkpoint(tmp_path).path == step_dir(tmp_path, 1)


def _edit_state(folder, reseal: bool, **changes) -> None:
    """Change fields of ``folder/state.json``; ``reseal``: recompute its own checksum (as a tool that knows it would)."""
    data = json.loads((folder / "state.json").read_text())
    data.update(changes)
    if reseal:
        ck.write_state(folder, data)
    else:
        (folder / "state.json").write_text(json.dumps(data, indent=1))


@pytest.mark.parametrize("reseal, words", [(False, "does not match its own checksum"),
                                           (True, "says iteration 5, but its folder is step_000002")])
def test_an_edited_iteration_is_refused_not_taken(tmp_path, reseal, words):
    trained_run(tmp_path, 2)
    folder = step_dir(tmp_path, 2)
    _edit_state(folder, reseal, iteration=5)  # resumed, it would skip steps 3 to 5
    with pytest.raises(CheckpointError, match=words) as err:
        choose_checkpoint(tmp_path, "step_2")
    message = str(err.value)
    assert str(folder / "state.json") in message and "--checkpoint step_N" in message and "\n" not in message
    choice = choose_checkpoint(tmp_path)  # without --checkpoint: skipped, and the note says why
    assert choice.path == step_dir(tmp_path, 1) and choice.state.iteration == 1
    assert choice.notes[0].startswith("skipping step_000002: checkpoint file") and words in choice.notes[0]


def test_any_edit_of_state_json_breaks_its_checksum(tmp_path):
    trained_run(tmp_path, 1)
    folder = step_dir(tmp_path, 1)
    data = json.loads((folder / "state.json").read_text())
    assert data["checksum"] == ck.state_checksum(data) and len(data["checksum"]) == 64
    _edit_state(folder, False, trainer={"nonfinite_streak": 2})
    with pytest.raises(CheckpointError, match="does not match its own checksum"):
        verify_checkpoint(folder)


def test_a_state_json_without_a_checksum_of_an_older_flowgrove_loads_with_a_note(tmp_path):
    trainer = trained_run(tmp_path, 2)
    for n in (1, 2):
        data = json.loads((step_dir(tmp_path, n) / "state.json").read_text())
        del data["checksum"]
        (step_dir(tmp_path, n) / "state.json").write_text(json.dumps(data))
    choice = choose_checkpoint(tmp_path)
    assert choice.path == step_dir(tmp_path, 2)
    assert choice.notes == (f"{step_dir(tmp_path, 2) / 'state.json'} has no checksum of its own (an older flowgrove "
                            "wrote it); only its iteration was checked, against the folder name",)
    fresh = make()
    restore_checkpoint(fresh, choice.path, choice.state)
    assert fresh.iteration == 2 and all(torch.equal(a, b) for a, b in zip(fresh.params, trainer.params))
    _edit_state(step_dir(tmp_path, 2), False, iteration=1)  # the folder name still catches an edited iteration
    assert choose_checkpoint(tmp_path).path == step_dir(tmp_path, 1)


def test_a_folder_without_state_json_is_skipped(tmp_path):
    trained_run(tmp_path, 2)
    (step_dir(tmp_path, 2) / "state.json").unlink()  # killed before rank 0 wrote it (cannot happen after the rename)
    choice = choose_checkpoint(tmp_path)
    assert choice.path == step_dir(tmp_path, 1) and "skipping step_000002" in choice.notes[0]


def test_the_metadata_unpickler_admits_dcp_records_only(tmp_path):
    import pickle

    trained_run(tmp_path, 1)
    metadata = step_dir(tmp_path, 1) / "dcp" / ".metadata"
    assert ck.sharded.read_metadata(metadata.parent).state_dict_metadata
    metadata.write_bytes(pickle.dumps(os.system))  # a checkpoint crafted to run code when loaded
    with pytest.raises(pickle.UnpicklingError, match="system is not part of DCP metadata"):
        ck.sharded.read_metadata(metadata.parent)


def test_a_checkpoint_of_the_old_single_file_format_is_a_one_line_error(tmp_path):
    trained_run(tmp_path, 1)
    folder = step_dir(tmp_path, 1)
    state = json.loads((folder / "state.json").read_text())
    state["files"] = {"trainable.safetensors": "0" * 64, "optimizer.pt": "0" * 64}
    del state["checksum"]  # that format had none
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="single-file format of an older flowgrove") as err:
        verify_checkpoint(folder)
    assert "\n" not in str(err.value)


def test_a_checkpoint_before_any_optimizer_step_keeps_adam_unstarted(tmp_path):
    # get_state_dict would initialise AdamW's state with a zero step (step count 1), changing the bias
    # correction of the first real step after a resume; such a checkpoint holds no optimizer part instead.
    trainer = make()
    trainer.iteration = 1  # as after a step whose every optimizer step was skipped
    save_checkpoint(trainer.state(), tmp_path, config_to_yaml(trainer.cfg))
    assert trainer.optimizer.state == {}
    assert ck.sharded.stored_parts(step_dir(tmp_path, 1) / "dcp") == {"model", "ema"}
    fresh = make()
    restore_checkpoint(fresh, step_dir(tmp_path, 1))
    assert fresh.optimizer.state == {} and fresh.iteration == 1


def test_parameters_without_adam_state_stay_without_after_a_load(tmp_path):
    # A parameter that has had no gradient yet (outside the trained window) has no AdamW state; the saved state of
    # the others loads, and the fresh optimizer does not invent one for it.
    from flowgrove.training.parts import TrainingState

    def build():
        torch.manual_seed(0)
        module = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
        params = list(module.parameters())
        return TrainingState(module, torch.optim.AdamW(params, lr=0.1), params, None, None, 0, {})

    saved = build()
    saved.module["a"](torch.randn(2, 3)).sum().backward()
    saved.optimizer.step()
    ck.sharded.save(saved, tmp_path / "dcp")
    fresh = build()
    ck.sharded.load(fresh, tmp_path / "dcp")
    assert set(fresh.optimizer.state) == set(fresh.module["a"].parameters())
    for p, q in zip(fresh.module["a"].parameters(), saved.module["a"].parameters()):
        assert torch.equal(fresh.optimizer.state[p]["exp_avg"], saved.optimizer.state[q]["exp_avg"])


def _linear_state(width: int):
    from flowgrove.training.parts import TrainingState

    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"a": torch.nn.Linear(3, width)})
    params = list(module.parameters())
    return TrainingState(module, torch.optim.AdamW(params, lr=0.1), params, None, None, 1, {})


def test_a_checkpoint_of_another_shape_is_a_one_line_error(tmp_path):
    # DCP raises its CheckpointException, a BaseException that no `except Exception` sees: it must still be one line
    save_checkpoint(_linear_state(3), tmp_path, "{}\n")
    with pytest.raises(CheckpointError, match="does not fit this trainer .*Size mismatch") as err:
        ck.load_checkpoint(_linear_state(4), step_dir(tmp_path, 1))
    assert "\n" not in str(err.value)


def test_a_failed_shard_write_is_the_os_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint import filesystem

    def full(transforms, stream, *args, **kwargs):
        stream.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer = trained_run(tmp_path, 1)
    trainer.step()
    monkeypatch.setattr(filesystem, "_write_item", full)
    with pytest.raises(ck.CheckpointWriteError) as err:
        save_checkpoint(trainer.state(), tmp_path, config_to_yaml(trainer.cfg))
    assert str(err.value) == (f"cannot write checkpoint {step_dir(tmp_path, 2)} (No space left on device); its partial "
                              "files were removed and the checkpoints written before are intact")
    cause = err.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC and cause.filename.endswith(".step_000002.tmp/dcp")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert choose_checkpoint(tmp_path).notes == ()
