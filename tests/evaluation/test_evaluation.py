"""Periodic evaluation in a real (tiny) digits run: metrics rows, grids, eval.jsonl, best checkpoint, report, guard."""

from __future__ import annotations

import json

import pytest
import torch

from flowgrove.cli import main
from flowgrove.config.load import load_config
from flowgrove.runs.metrics import read_metrics
from flowgrove.training import method

TINY = ["rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3",
        "eval.samples_per_prompt=2", "run.progress=false", "run.checkpoint_every=1", "rewards={boldness: 1.0}",
        "eval.judges=[digit_classifier]", "eval.every=2", "eval.hybrid_steps=2"]


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
    assert sorted(p.name for p in (run / "eval_grids").glob("*.png")) == [f"step_00000{i}.png" for i in (0, 2, 4)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_end"]["step"] == 4 and summary["eval_end"]["reward"] == pytest.approx(summary["heldout_reward_after"])
    assert summary["eval_start"]["judge/digit_classifier"] > 0.5


def test_hybrid_inference_is_evaluated_beside_the_policy(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evals = read_metrics(run / "eval.jsonl")
    for key in ("eval/hybrid/reward", "eval/hybrid/reward/boldness", "eval/hybrid/judge/digit_classifier",
                "eval/hybrid/diversity", "eval/hybrid/diversity_ratio", "eval/hybrid/mmd2"):
        assert all(key in e for e in evals), key
    # the base model's own hybrid is the base model: the same samples as the policy's at step 0
    assert evals[0]["eval/hybrid/reward"] == pytest.approx(evals[0]["eval/reward"], abs=1e-6)
    assert evals[-1]["eval/hybrid/reward"] != pytest.approx(evals[-1]["eval/reward"], abs=1e-6)
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert rows[4]["eval/hybrid/reward"] == evals[-1]["eval/hybrid/reward"]
    assert sorted(p.name for p in (run / "eval_grids" / "hybrid").iterdir()) == [f"step_00000{i}.png" for i in (0, 2, 4)]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/hybrid/reward")] == [0, 2, 4]
    text = (run / "report.html").read_text()
    assert "step_000004 hybrid" in text and "hybrid held-out reward" not in text  # curve labels live inside PNGs
    assert json.loads((run / "summary.json").read_text())["eval_end"]["hybrid/reward"] == evals[-1]["eval/hybrid/reward"]


def test_hybrid_steps_beyond_the_evaluation_grid_is_an_error(tmp_path, capsys):
    args = ["train", "--steps", "1", "--out", str(tmp_path / "r"), *TINY, "eval.hybrid_steps=4"]
    assert main(args) == 2
    assert "eval.hybrid_steps=4 is more than eval.num_steps=3" in capsys.readouterr().err


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
    assert "<th>start</th><th>best</th><th>end</th>" in text  # summary.json's three evaluations side by side


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


@pytest.mark.slow
def test_guard_fires_on_a_reward_hacking_run_and_not_on_a_healthy_one(tmp_path):
    """Boldness alone at lr 1e-3 hacks the digits (the classifier judge collapses); the default run does not."""
    common = ["--steps", "10", "eval.every=5", "eval.samples_per_prompt=4", "run.progress=false"]
    hack, healthy = tmp_path / "hack", tmp_path / "healthy"
    assert main(["train", "--out", str(hack), *common, "rewards={boldness: 1.0}", "train.lr=1e-3",
                 "eval.judges=[digit_classifier]"]) == 0
    assert main(["train", "--out", str(healthy), *common]) == 0
    hacked, fine = read_metrics(hack / "eval.jsonl"), read_metrics(healthy / "eval.jsonl")
    assert hacked[-1]["eval/reward"] > hacked[0]["eval/reward"] + 0.1  # the trained reward climbs...
    assert hacked[-1]["eval/judge/digit_classifier"] < hacked[0]["eval/judge/digit_classifier"] - 0.2  # ...the judge falls
    assert sum(e["guard/alarms"] for e in hacked) >= 1 and any("judge digit_classifier fell" in m for e in hacked for m in e["alarms"])
    assert sum(e["guard/alarms"] for e in fine) == 0 and fine[-1]["eval/diversity_ratio"] > 0.5


def test_hybrid_inference_switches_from_the_trained_to_the_base_model(run):
    import torch

    from flowgrove.evaluation.evaluate import hybrid_images
    from flowgrove.recipes.sample import load_run_and_base
    from flowgrove.training import method
    from flowgrove.training.trainer import ode_images

    trainer, base = load_run_and_base(run)
    rows, sigmas = torch.arange(2), method.base_sigmas(trainer.cfg, 4)
    trained = ode_images(trainer.policy, trainer.test_cond, rows, sigmas, 7)
    with trainer.weights_swapped(base):
        untrained = ode_images(trainer.policy, trainer.test_cond, rows, sigmas, 7)
    assert torch.allclose(hybrid_images(trainer.held_out(), base, trainer.test_cond, rows, sigmas, 7, 4), trained, atol=1e-6)
    assert torch.allclose(hybrid_images(trainer.held_out(), base, trainer.test_cond, rows, sigmas, 7, 0), untrained, atol=1e-6)
    mixed = hybrid_images(trainer.held_out(), base, trainer.test_cond, rows, sigmas, 7, 2)
    assert not torch.allclose(mixed, trained) and not torch.allclose(mixed, untrained)


def test_resume_from_the_best_checkpoint_drops_later_evaluations(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    best = json.loads((copy / "best.json").read_text())["step"]
    assert main(["train", "--resume", str(copy), "--checkpoint", "best", "--steps", "5"]) == 0
    steps = [e["step"] for e in read_metrics(copy / "eval.jsonl")]
    assert steps == [s for s in (0, 2, 4) if s <= best] + [s for s in (2, 4, 5) if s > best]



def test_kl_to_base_uses_the_cps_step_and_leaves_out_the_step_without_noise(tmp_path, monkeypatch):
    # With sampler.noise=cps the KL to the base is taken between CPS transitions (std g * sigma_next); the step onto
    # sigma 0 draws no noise and has no KL (it was ||dmu||^2 / 0 = inf), so 2 of the 3 evaluation steps count.
    import math

    from flowgrove.evaluation import evaluate

    stds, real = [], evaluate.transition_kl

    def recording(mean, ref_mean, std, **kwargs):
        stds.append(std.detach().clone())
        return real(mean, ref_mean, std, **kwargs)

    monkeypatch.setattr(evaluate, "transition_kl", recording)
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY, "sampler.noise=cps", "sampler.noise_level=0.8"]) == 0
    evals = read_metrics(out / "eval.jsonl")
    assert evals[0]["eval/kl"] == 0.0 and 0 < evals[-1]["eval/kl"] < float("inf")
    sigmas = method.base_sigmas(load_config(None, TINY), 3)
    want = [math.sin(0.4 * math.pi) * float(s) for s in sigmas[1:3]]  # the two noisy steps' CPS std
    assert len(stds) == 2 * len(evals) and all(torch.allclose(std, torch.full_like(std, w))
                                               for i, std in enumerate(stds) for w in [want[i % 2]])
