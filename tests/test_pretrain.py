"""Pretraining of the digits task: the rectified-flow pair, determinism, the files it writes and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flowgrove.policies import build_policy
from flowgrove.pretrain import logit_normal_sigma, main, pretrain_digits, rectified_flow_pair
from flowgrove.rewards import build_reward


def test_rectified_flow_pair_by_hand():
    # x0 = 1, noise = 3, sigma = 0.25: x = 0.75 * 1 + 0.25 * 3 = 1.5, target = 3 - 1 = 2.
    x, target = rectified_flow_pair(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0), torch.tensor([0.25]))
    assert x.flatten().tolist() == [1.5] * 4 and target.flatten().tolist() == [2.0] * 4


def test_logit_normal_sigma_is_seeded_and_in_unit_interval():
    a = logit_normal_sigma(1000, torch.Generator().manual_seed(0))
    b = logit_normal_sigma(1000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and bool(((a > 0) & (a < 1)).all())
    assert abs(a.median().item() - 0.5) < 0.05  # sigmoid(N(0, 1)) has median sigmoid(0) = 0.5


def test_pretrain_is_deterministic_and_writes_loadable_files(tmp_path):
    kwargs = dict(steps=5, classifier_steps=5, seed=0, progress=False, judge_per_digit=2)
    first = pretrain_digits(tmp_path / "a", **kwargs)
    second = pretrain_digits(tmp_path / "b", **kwargs)
    for name in ("digits_policy.safetensors", "digits_classifier.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.judged_accuracy == second.judged_accuracy and first.final_loss == second.final_loss
    report = json.loads((tmp_path / "a" / "digits_pretrain.json").read_text())
    assert report["architecture"]["transformer"]["num_attention_heads"] == 2
    assert set(report["metrics"]) >= {"classifier_accuracy", "judged_accuracy", "reward_means", "wall_s"}
    policy = build_policy("digits", weights=first.policy_path)
    reward = build_reward("digit_classifier", weights=first.classifier_path)
    images = policy.decode(torch.zeros(2, *policy.latent_shape))
    assert reward(images, ["a handwritten one", "a handwritten two"]).shape == (2,)


def test_cli_writes_the_files(tmp_path, capsys):
    argv = ["digits", "--out", str(tmp_path), "--steps", "2", "--classifier-steps", "2", "--quiet",
            "--judge-per-digit", "1"]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "digits_policy.safetensors", "digits_classifier.safetensors", "digits_pretrain.json"}
    assert "judged sample accuracy" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        pretrain_digits("unused", steps=0, classifier_steps=1)
    with pytest.raises(SystemExit):
        main(["cats"])
