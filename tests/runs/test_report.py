"""report.html of a real tiny run without periodic evaluation (``eval.every=0``): it shows what the run wrote (the
held-out reward and samples before and after training) and says why the evaluation sections are absent."""

from __future__ import annotations

import base64
import json

import pytest

from flowgrove.cli import main
from flowgrove.runs.report import render_report

from test_evaluation import TINY  # the evaluation tests' tiny digits run, here without periodic evaluation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run with ``eval.every=0``: the held-out prompts are sampled before and after training only."""
    out = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY, "eval.every=0", "eval.hybrid_steps=0"]) == 0
    return out


def _inline(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def test_a_run_without_periodic_evaluation_shows_its_before_and_after(run):
    assert not (run / "eval.jsonl").exists() and not (run / "best.json").exists()
    text = (run / "report.html").read_text()
    assert text == render_report(run)  # the run's own report is the one its files give
    for name in ("samples_before.png", "samples_after.png"):  # the held-out grids, inline
        assert _inline(run / name) in text, name
    summary = json.loads((run / "summary.json").read_text())
    assert "<th></th><th>before</th><th>after</th>" in text
    names = [key[len("heldout_"):-len("_before")] for key in summary if key.endswith("_before")]
    assert names == ["reward", "reward/boldness"], names
    for key in names:
        row = (f"<tr><th>{key}</th><td>{summary[f'heldout_{key}_before']:.4g}</td>"
               f"<td>{summary[f'heldout_{key}_after']:.4g}</td></tr>")
        assert row in text, row
    assert "<th>heldout_reward_before</th>" not in text  # not repeated in the run's own table


def test_it_says_why_there_is_no_best_checkpoint_nor_diversity(run):
    text = (run / "report.html").read_text()
    assert "No best checkpoint yet" not in text and "Periodic evaluation was off (eval.every=0)" in text
    assert "Set eval.every=N to evaluate every N steps" in text
    for empty in ("<h2>Diversity and drift</h2>", "<h2>Guard alarms</h2>", "No evaluation grids"):
        assert empty not in text, empty
    assert text.count("data:image/png;base64,") == 3  # the reward curve and the two grids


def test_a_periodically_evaluated_run_keeps_its_evaluation_sections(run, tmp_path):
    # the same folder with eval.every=2 in its config but no evaluation yet: a running run, not one without them
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text().replace("every: 0", "every: 2"))
    (tmp_path / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    text = render_report(tmp_path)
    assert "No best checkpoint yet." in text and "<h2>Guard alarms</h2>" in text and "Periodic evaluation was off" not in text
    assert "<h2>Diversity and drift</h2>" not in text  # nothing to draw yet, so no empty section
