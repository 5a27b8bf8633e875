"""The command line end to end on the digits task: smoke runs of every preset, the run directory, errors."""

from __future__ import annotations

import json

import pytest

from flowgrove.cli import main
from flowgrove.config.load import load_config, preset_names

TINY = ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.samples_per_prompt=1", "run.progress=false"]


# presets of real models (policy.name sd3, ...) need their weights; their own tests train them on tiny pipelines
@pytest.mark.parametrize("method", [m for m in preset_names() if load_config(method=m).policy.name == "digits"])
def test_every_preset_trains_two_steps(tmp_path, method, capsys):
    out = tmp_path / method
    extra = ["rollout.prompts_per_step=1"] if method.startswith(("branch", "tree")) else []
    assert main(["train", "--method", method, "--steps", "2", "--out", str(out), *TINY, *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "steps", "wall_seconds", "heldout_reward_before", "heldout_reward_after", "nfe_old", "nfe_new"):
        assert key in summary
    assert summary["method"] == method and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss", "clip_fraction", "approx_kl", "grad_norm", "seconds_rollout",
                "seconds_reward", "seconds_update", "nfe_old", "nfe_new"):
        assert key in rows[0]
    for name in ("config.yaml", "samples_before.png", "samples_after.png", "reward_curve.png", "tensorboard"):
        assert (out / name).exists(), name
    assert "held-out reward" in capsys.readouterr().out


def test_run_directory_checkpoint_layout(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY, "run.checkpoint_every=1"]) == 0
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_000002"
    assert {p.name for p in ckpt.iterdir()} >= {"dcp", "rng.safetensors", "config.yaml", "state.json"}
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp"}  # one process, one shard
    # resuming a finished run with more steps continues it
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert main(["eval", str(out)]) == 0
    assert main(["sample", "--run", str(out), "--out", str(tmp_path / "s.png"), "--n", "1", "--steps", "2"]) == 0
    # a fresh run into a used directory is refused, not overwritten
    assert main(["train", "--steps", "1", "--out", str(out), *TINY]) == 2


def test_lora_trains_only_adapters(tmp_path):
    from flowgrove.config.load import load_config
    from flowgrove.training.setup import build_trainer

    trainer = build_trainer(load_config(None, TINY + ["policy.lora_rank=4"]))
    names = [n for n, p in trainer.policy.module.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters() if not p.requires_grad}
    trainer.step()
    assert all((p.detach() == frozen[n]).all() for n, p in trainer.policy.module.named_parameters() if n in frozen)


def test_methods_lists_every_preset(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out


def test_tasks_lists_every_task(capsys):
    from flowgrove.tasks.catalog import TASKS

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(TASKS) and "numbers" in TASKS
    assert lines[0].endswith("[default]") and "OCR" in lines[1]


def test_numbers_task_trains_two_steps_and_holds_out_the_test_numbers(tmp_path):
    from flowgrove.tasks.numbers import heldout_prompts, train_prompts
    from flowgrove.training.setup import build_trainer

    pytest.importorskip("onnxruntime")
    out = tmp_path / "numbers"
    assert main(["train", "task=numbers", "--steps", "2", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "heldout_reward/ocr_after" in summary and 0 <= summary["heldout_reward_after"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "reward/ocr" in rows[0]
    trainer = build_trainer(load_config(None, ["task=numbers", *TINY]))
    assert trainer.prompts == train_prompts() and trainer.test_prompts == heldout_prompts()


def test_config_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "x"), "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "y"), f"data.train={empty}"]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "z"), "policy.path=/nonexistent.safetensors"]) == 2
    assert "pretrain digits" in capsys.readouterr().err


def test_sample_writes_a_grid(tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", "--out", str(out), "--n", "2", "--steps", "4"]) == 0
    assert out.stat().st_size > 0


def test_overrides_may_follow_options(tmp_path):
    out = tmp_path / "o"
    assert main(["train", "rollout.group_size=4", "--steps", "1", "--out", str(out), *TINY]) == 0
    assert "group_size: 4" in (out / "config.yaml").read_text()


def test_sample_uses_the_runs_ema_weights_unless_told_otherwise(tmp_path, monkeypatch):
    # EMA decay 0.5 over a few steps: the EMA and the raw weights differ, and sample must take the EMA by default
    from flowgrove.recipes import sample

    run = tmp_path / "run"
    assert main(["train", "--steps", "3", "--out", str(run), *TINY, "train.ema_decay=0.5", "train.lr=1e-2"]) == 0
    grids = {}

    def grab(images, path, columns):
        grids[str(path)] = images.clone()

    monkeypatch.setattr(sample, "save_grid", grab)
    for flag in ([], ["--ema"], ["--no-ema"]):
        out = str(tmp_path / f"s{''.join(flag)}.png")
        assert main(["sample", "--run", str(run), "--n", "2", "--prompt", "a handwritten one", "--out", out, *flag]) == 0
    default, ema, raw = (grids[str(tmp_path / f"s{f}.png")] for f in ("", "--ema", "--no-ema"))
    assert (default == ema).all() and not (default == raw).all()


def test_sample_ema_on_a_run_without_ema_is_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--ema", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ema" in err[0] and "train.ema_decay=0" in err[0]


@pytest.mark.parametrize("flags,named", [
    (["--port", "70000"], "--port 70000 is not a port; give 0..65535"),
    (["--port", "-1"], "--port -1 is not a port; give 0..65535"),
    (["--max-concurrent", "0"], "--max-concurrent 0 must be an integer >= 1"),
    (["--host", "0.0.0.0"], "set a shared secret with FLOWGROVE_REWARD_TOKEN=SECRET (or --token SECRET)"),
])
def test_serve_reward_flag_errors_are_one_line(flags, named, capsys, monkeypatch):
    monkeypatch.delenv("FLOWGROVE_REWARD_TOKEN", raising=False)
    assert main(["serve-reward", "brightness", *flags]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and captured.err.count("\n") == 1 and not captured.out  # nothing served


@pytest.mark.parametrize("option,named", [
    ("url: 'http://127.0.0.1:1', timeout: abc", "reward_options.remote.timeout='abc' must be a number (reward 'remote')"),
    ("url: 'http://127.0.0.1:1', timeout: -1", "reward_options.remote: timeout=-1 must be a number > 0; fix the timeout option"),
    ("url: 'reward-host:18085'", "remote: url='reward-host:18085' is not an http(s)://HOST:PORT address"),
])
def test_bad_remote_reward_options_are_one_line(tmp_path, option, named, capsys):
    options = f"reward_options={{remote: {{check: false, {option}}}}}"
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "run"), *TINY, "rewards={remote: 1.0}", options]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
