"""The guard's alarm logic and the best-checkpoint criterion (pure functions over evaluation histories)."""

from __future__ import annotations

import math

from flowgrove.evaluation.guard import best_score, check_guard, diversity_alarm, is_new_best, judge_alarms


def _ev(step, reward, judge=None, ratio=1.0):
    row = {"step": step, "eval/reward": reward, "eval/diversity_ratio": ratio}
    if judge is not None:
        row["eval/judge/digit_classifier"] = judge
    return row


def test_judge_drop_fires_when_reward_rises_and_judge_falls_over_the_window():
    history = [_ev(0, 0.75, 0.98), _ev(10, 0.85, 0.97), _ev(20, 0.9, 0.95), _ev(30, 0.95, 0.90)]
    alarms = judge_alarms(history, window=3, drop=0.05)  # 0.98 -> 0.90 = 0.08 > 0.05 while 0.75 -> 0.95
    assert [a.kind for a in alarms] == ["judge_drop"] and alarms[0].step == 30
    assert "digit_classifier fell 0.980 -> 0.900" in alarms[0].message and "\n" not in alarms[0].message
    short = judge_alarms(history, window=1, drop=0.05)  # 0.95 -> 0.90 is not more than 0.05, but 0.98 -> 0.90 is
    assert len(short) == 1 and "steps 0-30" in short[0].message
    assert judge_alarms(history, window=1, drop=0.1) == []


def test_judge_drop_needs_the_trained_reward_to_rise():
    history = [_ev(0, 0.9, 0.98), _ev(10, 0.8, 0.5)]
    assert judge_alarms(history, window=3, drop=0.05) == []
    assert judge_alarms(history[:1], window=3, drop=0.05) == []


def test_diversity_alarm_needs_the_whole_window_below_the_fraction():
    history = [_ev(0, 0.7), _ev(10, 0.8, ratio=0.4), _ev(20, 0.8, ratio=0.6), _ev(30, 0.9, ratio=0.3)]
    assert diversity_alarm(history, window=2, fraction=0.5) == []
    history.append(_ev(40, 0.9, ratio=0.2))
    alarms = diversity_alarm(history, window=2, fraction=0.5)
    assert len(alarms) == 1 and alarms[0].step == 40 and "0.20 of the base" in alarms[0].message


def test_healthy_history_raises_nothing():
    history = [_ev(s, 0.75 + s / 1000, 0.98 - s / 10000, 1.0 - s / 1000) for s in range(0, 101, 10)]
    assert check_guard(history, window=3, judge_drop=0.05, diversity_fraction=0.5) == []


def test_best_score_criteria_and_selection():
    row = {"step": 5, "eval/reward": 0.8, "eval/judge/a": 0.6, "eval/judge/b": 0.4}
    assert best_score(row, "judges") == 0.5
    assert best_score(row, "reward") == 0.8
    assert best_score(row, "combined") == 0.65
    assert math.isnan(best_score(row, "off"))
    assert best_score({"step": 1, "eval/reward": 0.7}, "judges") == 0.7  # no judge: the trained reward
    history = [_ev(0, 0.7, 0.98), _ev(10, 0.8, 0.99), _ev(20, 0.9, 0.99), _ev(30, 0.95, 0.6)]
    best = None
    for h in history:
        score = best_score(h, "judges")
        if is_new_best(score, best[0] if best else None):
            best = (score, h["step"])
    assert best == (0.99, 10)  # ties keep the earlier checkpoint; the hacked step 30 never wins
    assert not is_new_best(math.nan, None)


def test_a_settled_hack_keeps_alarming_against_the_base_evaluation():
    history = [_ev(0, 0.75, 0.98), _ev(10, 0.95, 0.30), _ev(20, 1.0, 0.0), _ev(30, 1.0, 0.0), _ev(40, 1.0, 0.0),
               _ev(50, 1.0, 0.0)]
    alarms = judge_alarms(history, window=3, drop=0.05)  # flat over the window, far below the base
    assert len(alarms) == 1 and alarms[0].judge == "digit_classifier" and "steps 0-50" in alarms[0].message
    assert len(judge_alarms(history[:3], window=1, drop=0.05)) == 1  # one alarm per judge, the window's first
