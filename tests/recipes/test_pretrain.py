"""Pretraining of the digits task: the rectified-flow pair, determinism, the files it writes and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flowgrove.policies import build_policy
from flowgrove.recipes.pretrain import classifier_batch, logit_normal_sigma, main, pretrain_digits, rectified_flow_pair
from flowgrove.rewards import build_reward
from flowgrove.tasks.digits import NEGATIVE_FAMILIES, NOT_A_DIGIT, DigitsData, dilate_ink, load_digits_tensors, not_a_digit
from flowgrove.tasks.digits import saturate_ink


def test_rectified_flow_pair_by_hand():
    # x0 = 1, noise = 3, sigma = 0.25: x = 0.75 * 1 + 0.25 * 3 = 1.5, target = 3 - 1 = 2.
    x, target = rectified_flow_pair(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0), torch.tensor([0.25]))
    assert x.flatten().tolist() == [1.5] * 4 and target.flatten().tolist() == [2.0] * 4


def test_logit_normal_sigma_is_seeded_and_in_unit_interval():
    a = logit_normal_sigma(1000, torch.Generator().manual_seed(0))
    b = logit_normal_sigma(1000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and bool(((a > 0) & (a < 1)).all())
    assert abs(a.median().item() - 0.5) < 0.05  # sigmoid(N(0, 1)) has median sigmoid(0) = 0.5


def test_dilate_ink_by_hand():
    # One ink pixel at (3, 3): one cross dilation lights it and its 4 neighbours (5 pixels); a second
    # one gives the diamond |dr| + |dc| <= 2, 1 + 4 + 8 = 13 pixels. A corner pixel keeps only 3 (padding).
    ink = torch.zeros(1, 1, 8, 8)
    ink[0, 0, 3, 3] = 1.0
    once, twice = dilate_ink(ink, 1), dilate_ink(ink, 2)
    assert once.sum().item() == 5 and once[0, 0, 2:5, 3].tolist() == [1.0, 1.0, 1.0]
    assert once[0, 0, 2, 2].item() == 0.0  # diagonal neighbour stays dark
    assert twice.sum().item() == 13 and twice[0, 0, 1, 3].item() == 1.0
    corner = torch.zeros(1, 1, 8, 8)
    corner[0, 0, 0, 0] = 0.5
    assert dilate_ink(corner, 1).sum().item() == 1.5  # 3 pixels of 0.5


def test_saturate_ink_by_hand():
    # ink u = (x + 1) / 2; with fraction 1 every row is divided by s = lowest + (1 - lowest) U, U the
    # generator's first draw, and clamped to 1. Row of ink (0, 0.25, 0.5, 1): s = 0.5 + 0.5 U.
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(16).view(1, 1, 8, 8) * 2 - 1
    s = 0.5 + 0.5 * torch.rand(1, generator=torch.Generator().manual_seed(3)).item()
    out = (saturate_ink(x, torch.Generator().manual_seed(3), fraction=1.0, lowest=0.5) + 1) / 2
    expected = torch.tensor([0.0, min(0.25 / s, 1), min(0.5 / s, 1), 1.0]).repeat(16).view(1, 1, 8, 8)
    torch.testing.assert_close(out, expected)  # background stays 0, strokes brighten
    assert torch.equal(saturate_ink(x, torch.Generator().manual_seed(3), fraction=0.0), x)
    with pytest.raises(ValueError, match="fraction"):
        saturate_ink(x, torch.Generator(), fraction=2.0)


def test_not_a_digit_families():
    data = load_digits_tensors()
    images, labels = data.images[:40], data.labels[:40]  # [40, 1, 8, 8], [40]
    for family in NEGATIVE_FAMILIES:
        a = not_a_digit(images, labels, family, torch.Generator().manual_seed(0))
        b = not_a_digit(images, labels, family, torch.Generator().manual_seed(0))
        assert a.shape == images.shape and torch.equal(a, b), family
        assert bool(((a >= -1) & (a <= 1)).all()), family
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(not_a_digit(images, labels, "inverted", generator), -images)  # 1 - u in ink = -x
    for family in ("filled", "grey_background", "two_digits"):  # these only add ink to the digit
        out = not_a_digit(images, labels, family, generator)
        assert bool((out >= images).all()) and out.mean() > images.mean() + 0.1, family
    with pytest.raises(ValueError, match="inverted"):
        not_a_digit(images, labels, "cats", generator)


def test_classifier_batch_layout():
    data = load_digits_tensors()
    train = DigitsData(data.images[:100], data.labels[:100])
    a = classifier_batch(train, torch.Generator().manual_seed(0), batch=12, negatives=6)
    b = classifier_batch(train, torch.Generator().manual_seed(0), batch=12, negatives=6)
    assert a.images.shape == (18, 1, 8, 8) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert bool((a.labels[:12] < 10).all()) and a.labels[12:].tolist() == [NOT_A_DIGIT] * 6


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
    assert set(report["metrics"]) >= {"classifier_accuracy", "judged_accuracy", "reward_means", "wall_s",
                                      "negative_rewards", "saturated_reward"}
    assert set(report["metrics"]["negative_rewards"]) == set(NEGATIVE_FAMILIES)
    assert report["architecture"]["classifier_classes"] == 11
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


def test_pretrain_numbers_is_reproducible_and_never_trains_on_a_test_number(tmp_path, capsys):
    from flowgrove.recipes.pretrain_numbers import number_dataset, pretrain_numbers
    from flowgrove.tasks.digits import split_digits
    from flowgrove.tasks.numbers import TEST_NUMBERS, TRAIN_NUMBERS

    data = number_dataset(split_digits(load_digits_tensors()).train, TRAIN_NUMBERS, 512, seed=0)
    assert data.images.shape == (512, 1, 8, 16) and set(data.labels.tolist()).isdisjoint(TEST_NUMBERS)
    kwargs = dict(steps=3, seed=0, progress=False, data_size=256, judge_per_number=1)
    first = pretrain_numbers(tmp_path / "a", **kwargs)
    pretrain_numbers(tmp_path / "b", **kwargs)
    a = load_file(str(tmp_path / "a" / "numbers_policy.safetensors"))
    b = load_file(str(tmp_path / "b" / "numbers_policy.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "a" / "numbers_pretrain.json").read_text())
    assert report["split"]["test_numbers"] == list(TEST_NUMBERS)
    assert set(report["metrics"]) >= {"policy_test", "policy_train", "real_test", "final_loss", "wall_s"}
    assert set(report["metrics"]["policy_test"]) == {"ocr", "exact_read", "digit_pair"}
    policy = build_policy("numbers", path=first.policy_path)
    assert policy.decode(torch.zeros(1, *policy.latent_shape)).shape == (1, 3, 8, 16)
    assert main(["numbers", "--out", str(tmp_path / "c"), "--steps", "1", "--data", "64", "--judge-per-number", "1",
                 "--quiet"]) == 0
    assert "base policy on the test numbers ocr" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"numbers_policy.safetensors", "numbers_pretrain.json"}
