"""Periodic evaluation in a real (tiny) digits run: metrics rows, grids, eval.jsonl, best checkpoint, report, guard."""

from __future__ import annotations

import json

import pytest

from flowgrove.cli import main
from flowgrove.metrics import read_metrics

TINY = ["rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3",
        "eval.samples_per_prompt=2", "run.progress=false", "run.checkpoint_every=1", "rewards={boldness: 1.0}",
        "eval.judges=[digit_classifier]", "eval.every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--steps", "4", "--out", str(out), *TINY]) == 0
    return out


def test_evaluations_reach_metrics_eval_jsonl_grids_and_summary(run):
    evals = read_metrics(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    for key in ("eval/reward", "eval/reward/boldness", "eval/judge/digit_classifier", "eval/diversity",
                "eval/diversity_ratio", "eval/mmd2", "eval/kl", "guard/alarms"):
        assert key in evals[-1], key
    assert evals[0]["eval/kl"] == 0.0 and evals[0]["eval/diversity_ratio"] == 1.0 and evals[-1]["eval/kl"] > 0
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert rows[2]["eval/judge/digit_classifier"] == evals[1]["eval/judge/digit_classifier"] and "eval/reward" not in rows[1]
    assert sorted(p.name for p in (run / "eval_grids").iterdir()) == [f"step_00000{i}.png" for i in (0, 2, 4)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_end"]["step"] == 4 and summary["eval_end"]["reward"] == pytest.approx(summary["heldout_reward_after"])
    assert summary["eval_start"]["judge/digit_classifier"] > 0.5


def test_best_checkpoint_is_the_criterions_pick_and_export_takes_it(run, tmp_path):
    evals = read_metrics(run / "eval.jsonl")
    best = json.loads((run / "best.json").read_text())
    top = max(evals, key=lambda e: (e["eval/judge/digit_classifier"], -e["step"]))
    assert best["step"] == top["step"] and best["criterion"] == "judges"
    assert json.loads((run / "checkpoints" / "best" / "state.json").read_text())["iteration"] == best["step"]
    assert main(["export", str(run), "--out", str(tmp_path / "best"), "--checkpoint", "best"]) == 0
    assert (tmp_path / "best" / "config.json").is_file()


def test_report_is_self_contained(run):
    text = (run / "report.html").read_text()
    assert text.count("data:image/png;base64,") >= 5 and "src=\"http" not in text and "Guard alarms" in text


def test_guard_stop_checkpoints_and_exits_with_one_line(tmp_path, capsys):
    out = tmp_path / "stop"
    args = ["train", "--steps", "4", "--out", str(out), *TINY, "eval.every=1", "guard.window=1",
            "guard.diversity_fraction=2", "guard.action=stop"]  # diversity is always below twice the base's
    with pytest.raises(SystemExit) as err:
        main(args)
    message = str(err.value)
    assert "\n" not in message and "guard.action=stop after step 1" in message and "best checkpoint" in message
    assert (out / "checkpoints" / "step_000001").is_dir() and not (out / "checkpoints" / "step_000002").exists()
    assert read_metrics(out / "eval.jsonl")[-1]["guard/alarms"] == 1.0


def test_a_judge_that_is_trained_on_is_an_error(tmp_path, capsys):
    args = ["train", "--steps", "1", "--out", str(tmp_path / "r"), *TINY, "eval.judges=[boldness]"]
    assert main(args) == 2
    assert "eval.judges lists 'boldness', which is trained on" in capsys.readouterr().err
