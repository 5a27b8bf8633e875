"""`flowgrove bench --seeds N`: the summary over seeds by hand, the files and field names of a tiny real run, the
pairing of seeds across methods, and the one-line errors."""

from __future__ import annotations

import json

import pytest

from flowgrove.cli import main
from flowgrove.recipes.bench_report import EvalPoint, SeedRun, summarize_bench, worse_line

TINY = ["run.threads=1", "run.progress=false", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "eval.samples_per_prompt=1", "sampler.num_steps=6", "eval.num_steps=4"]


def _run(method: str, seed: int, step_seconds: float, curve: list[tuple[float, float]], judge: tuple[float, float]) -> SeedRun:
    """A hand-made record: 4 steps of ``step_seconds``, evaluations (seconds, reward) at steps 0, 2, 4."""
    points = [EvalPoint(2 * i, x, y, y, {"ocr": judge[0] if i == 0 else judge[1]}) for i, (x, y) in enumerate(curve)]
    return SeedRun(method, seed, [step_seconds] * 4, [6.0] * 4, [3.0] * 4, points)


def test_summary_over_seeds_by_hand_pairs_each_seed_with_the_references_same_seed():
    runs = {
        "ref": [_run("ref", 10, 5.0, [(0, 0.5), (10, 0.6), (20, 0.7)], (0.2, 0.5)),
                _run("ref", 11, 10.0, [(0, 0.5), (20, 0.8), (40, 0.9)], (0.2, 0.5))],
        "m": [_run("m", 10, 1.0, [(0, 0.5), (2, 0.8), (4, 0.6)], (0.2, 0.1)),
              _run("m", 11, 2.0, [(0, 0.5), (4, 0.6), (8, 0.4)], (0.2, 0.3))],
    }
    m = summarize_bench(runs, "ref")["m"]
    # time ratio per seed: 1 / 5 and 2 / 10 (mixing the seeds up would give 0.1 and 0.4)
    assert [s["time_ratio"] for s in m["per_seed"]] == pytest.approx([0.2, 0.2])
    assert m["time_ratio"]["mean"] == pytest.approx(0.2) and m["time_ratio"]["ci95"] == pytest.approx(0.0)
    # gain = final - before: +0.1 in seed 10 (0.5 -> 0.6, best 0.8 on the way), -0.1 in seed 11 (a decline)
    assert [s["gain"] for s in m["per_seed"]] == pytest.approx([0.1, -0.1])
    assert m["gain"]["mean"] == pytest.approx(0.0) and m["gain"]["ci95"] == pytest.approx(12.706205 * 0.1, abs=1e-6)
    assert m["best"]["mean"] == pytest.approx(0.7) and m["final"]["mean"] == pytest.approx(0.5)
    assert [s["judge_gain"] for s in m["per_seed"]] == pytest.approx([-0.1, 0.1])
    # the reference gains 0.2 and 0.4: paired differences -0.1 and -0.5
    assert m["gain_vs_reference"]["mean"] == pytest.approx(-0.3)
    # seed 10 reaches the reference's 0.7 between (0 s, 0.5) and (2 s, 0.8): 2 * 0.2 / 0.3 s; seed 11 never reaches 0.9
    assert [s["seconds_to_reference_reward"] for s in m["per_seed"]] == pytest.approx([4 / 3, None])
    reach = m["seconds_to_reference_reward"]
    assert reach == {"mean": pytest.approx(4 / 3), "ci95": None, "n": 1, "reached": "1/2"}
    ref = summarize_bench(runs, "ref")["ref"]
    assert ref["time_ratio"]["mean"] == 1.0 and ref["seconds_to_reference_reward"]["reached"] == "2/2"
    assert m["rollout_share"]["mean"] is None  # not timed in these records


def test_phase_shares_are_each_phase_over_the_step_seconds_summed():
    run = _run("m", 0, 5.0, [(0, 0.5), (10, 0.6), (20, 0.7)], (0.2, 0.5))
    run.step_seconds = [5.0, 5.0, 10.0, 0.0]
    run.phase_seconds = {"rollout": [3.0, 3.0, 6.0, 0.0], "reward": [1.0, 0.5, 1.0, 0.0], "update": [1.0, 1.5, 3.0, 0.0]}
    s = summarize_bench({"m": [run]}, "m")["m"]["per_seed"][0]
    # summed, not a mean of per-step ratios: 12 / 20, 2.5 / 20, 5.5 / 20
    assert (s["rollout_share"], s["reward_share"], s["update_share"]) == pytest.approx((0.6, 0.125, 0.275))


def test_summary_rejects_unpaired_seeds():
    runs = {"ref": [_run("ref", 10, 5.0, [(0, 0.5), (10, 0.6), (20, 0.7)], (0.2, 0.5)),
                    _run("ref", 11, 10.0, [(0, 0.5), (20, 0.8), (40, 0.9)], (0.2, 0.5))],
            "m": [_run("m", 10, 1.0, [(0, 0.5), (2, 0.8), (4, 0.6)], (0.2, 0.1)),
                  _run("m", 11, 2.0, [(0, 0.5), (4, 0.6), (8, 0.4)], (0.2, 0.3))]}
    with pytest.raises(ValueError, match="seed 11 compared with the reference's seed 10"):
        summarize_bench({"ref": runs["ref"], "m": runs["m"][::-1]}, "ref")


def _stat(mean: float, ci95: float | None) -> dict:
    return {"mean": mean, "ci95": ci95, "n": 3}


def test_worse_line_names_what_the_ci_excludes():
    fine = {"time_ratio": _stat(0.5, 0.1), "gain_vs_reference": _stat(-0.01, 0.05),
            "judge_gain_vs_reference": _stat(0.0, 0.01), "final_vs_reference": _stat(-0.01, 0.05)}
    bad = {"time_ratio": _stat(1.5, 0.2), "gain_vs_reference": _stat(-0.1, 0.05),
           "judge_gain_vs_reference": _stat(0.0, 0.01), "final_vs_reference": _stat(-0.1, 0.05)}
    line = worse_line({"ref": fine, "ok": fine, "bad": bad}, "ref", 3)
    assert "bad (time 1.50x ± 0.20x; gain -0.1000 ± 0.0500 vs ref; final -0.1000 ± 0.0500 vs ref)" in line
    assert "ok" not in line
    assert worse_line({"ref": fine, "ok": fine}, "ref", 3).endswith(": none.")
    assert worse_line({"ref": fine}, "ref", 1).startswith("One seed: no confidence intervals")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--methods", "dancegrpo,mixgrpo", "--seeds", "2", "--steps", "2", "--evals", "2",
            "--baseline", "dancegrpo", "--out", str(out), *TINY]  # --baseline: the old name of --reference
    assert main(argv) == 0
    return out


def test_tiny_bench_writes_the_fields_the_table_and_the_plot(two_seeds):
    data = json.loads((two_seeds / "bench.json").read_text())
    assert (data["reference"], data["seeds"], data["steps"], data["evals"]) == ("dancegrpo", 2, 2, [1, 2])
    assert data["judges"] == ["ocr"] and data["train_seeds"] == [0, 1]
    assert list(data["methods"]) == ["dancegrpo", "mixgrpo"]
    for name, m in data["methods"].items():
        for key in ("time_ratio", "gain", "judge_gain", "seconds_to_reference_reward", "best", "final"):
            assert set(m[key]) >= {"mean", "ci95"} and m[key]["n"] <= 2, (name, key)
        assert m["seconds_to_reference_reward"]["reached"].endswith("/2")
        for s in m["per_seed"]:  # the trainer's step seconds are its rollout, reward and update seconds
            assert s["rollout_share"] + s["reward_share"] + s["update_share"] == pytest.approx(1.0)
            assert 0 < s["rollout_share"] < 1 and 0 < s["update_share"] < 1
        assert [s["train_seed"] for s in m["per_seed"]] == [0, 1]
        assert [[p["step"] for p in s["curve"]] for s in m["per_seed"]] == [[0, 1, 2]] * 2
        for s in m["per_seed"]:
            assert s["gain"] == pytest.approx(s["curve"][-1]["reward"] - s["curve"][0]["reward"])
            assert s["judge_gain"] == pytest.approx(s["curve"][-1]["judges"]["ocr"] - s["curve"][0]["judges"]["ocr"])
    assert data["methods"]["dancegrpo"]["time_ratio"]["mean"] == 1.0
    table = (two_seeds / "bench.md").read_text()
    assert "| dancegrpo |" in table and "| mixgrpo |" in table and "Worse than dancegrpo" in table
    assert "rollout / reward / update share |" in table
    assert (two_seeds / "reward_vs_seconds.png").stat().st_size > 1000


def test_seeds_are_paired_and_a_seed_reruns_alone_to_the_same_numbers(two_seeds, tmp_path):
    data = json.loads((two_seeds / "bench.json").read_text())
    for m in data["methods"].values():
        first, second = m["per_seed"]
        assert first["before"] == second["before"]  # same base weights, held-out prompts and noise in every seed
        assert first["final"] != second["final"]  # ... but each seed trains differently
    # seed 1 of the two-seed bench is train.seed=1: a one-seed bench at train.seed=1 gives the same rewards
    assert main(["bench", "--methods", "dancegrpo,mixgrpo", "--seeds", "1", "--steps", "2", "--evals", "2",
                 "--out", str(tmp_path), *TINY, "train.seed=1"]) == 0
    alone = json.loads((tmp_path / "bench.json").read_text())
    assert alone["train_seeds"] == [1] and alone["seeds"] == 1
    for name, m in alone["methods"].items():
        assert [p["reward"] for p in m["per_seed"][0]["curve"]] == \
            [p["reward"] for p in data["methods"][name]["per_seed"][1]["curve"]]
        assert m["gain"]["ci95"] is None and m["time_ratio"]["ci95"] is None  # one seed: no CI (null)
    assert "One seed" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["--evals", "3", "--steps", "2"], "--evals 3 is more than --steps 2"),
    (["--reference", "flowgrpo"], "--reference 'flowgrpo' must be one of --methods"),
    (["mixgrpo:train.seed=3"], "train.seed differs between methods"),
    (["--methods", "dancegrpo,dancegrpo"], "must name each method once"),
    (["eval.judges=[boldness]"], "eval.judges lists 'boldness', which dancegrpo trains on"),
])
def test_errors_are_one_line_and_name_the_flag(argv, words, tmp_path, capsys):
    base = ["bench", "--methods", "dancegrpo,mixgrpo", "--out", str(tmp_path / "b")]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not (tmp_path / "b").exists()
