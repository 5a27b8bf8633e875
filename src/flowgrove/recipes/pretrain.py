"""``flowgrove pretrain digits``: the shipped weights of the embedded digits task, reproducibly (``pretrain numbers``:
``recipes/pretrain_numbers.py``).

The policy (tiny FLUX transformer + its CLIP text encoder) is trained by rectified flow on the training
split: ``sigma`` logit-normal, ``x_sigma = (1 - sigma) x0 + sigma noise``, target ``v = noise - x0``, MSE
(SD3, Esser et al. 2024). The digit classifier (the ``digit_classifier`` reward) is trained by cross-entropy
on the same split, half of it with strokes saturated to white (``saturate_ink``, still the digit), plus an
eleventh "not a digit" class made from it (``not_a_digit``: inverted, filled, grey background, noise, two
digits, speckle). Every random draw comes from seeded generators, so a seed gives the same files on one
machine; the policy's draws do not depend on the classifier's, so its weights do not change when only the
classifier recipe does. The report JSON records the architecture, the classifier's held-out accuracy, the
reward it gives to each not-a-digit family and to saturated held-out digits, and the judged accuracy (that
classifier's accuracy on Euler ODE samples of the pretrained policy) with base reward means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies import digits as digits_policy
from flowgrove.recipes import pretrain_numbers
from flowgrove.recipes.flow_pretrain import logit_normal_sigma, rectified_flow_pair, sample_prompts, train_policy  # noqa: F401
from flowgrove.rewards import digits as digits_rewards
from flowgrove.tasks.digits import NEGATIVE_FAMILIES, NOT_A_DIGIT, DigitsData, assets_dir, digit_prompts, load_digits_tensors
from flowgrove.tasks.digits import not_a_digit, saturate_ink, split_digits

DEFAULT_STEPS = 1500
DEFAULT_CLASSIFIER_STEPS = 2000
CLASSIFIER_HIDDEN = 256
REPORT_FILE = "digits_pretrain.json"


@dataclass(frozen=True)
class PretrainReport:
    """What ``pretrain_digits`` wrote and measured."""

    policy_path: str
    classifier_path: str
    report_path: str
    classifier_accuracy: float  # held-out real digits (arg-max over the 11 classes)
    negative_rewards: dict[str, float]  # family -> mean over held-out negatives of the best digit probability
    saturated_reward: float  # mean p(label) on held-out digits with saturated strokes
    judged_accuracy: float  # classifier accuracy on ODE samples of the pretrained policy
    judged_per_digit: list[float]  # [10]
    reward_means: dict[str, float]  # base-policy rewards on those samples
    final_loss: float  # rectified-flow loss, mean of the last 50 steps
    wall_s: float


@dataclass(frozen=True)
class JudgeResult:
    """Classifier verdicts on policy samples."""

    accuracy: float
    per_digit: list[float]  # [10]
    reward_means: dict[str, float]


def classifier_batch(train: DigitsData, generator: torch.Generator, batch: int = 128, negatives: int = 64,
                     bold_fraction: float = 0.5) -> DigitsData:
    """One batch of the 11-class classifier, ``batch`` digits then ``negatives`` not-digits (Dhamija et al. 2018).

    Digit rows are drawn with replacement, a ``bold_fraction`` of them saturated (``saturate_ink``). Negative
    rows are drawn the same way, saturated likewise, and each turned into a not-a-digit image of a uniformly
    drawn family (``not_a_digit``; every family is computed, one is kept per row), labelled ``NOT_A_DIGIT``.

    Returns:
        ``DigitsData`` with images ``[batch + negatives, 1, 8, 8]`` and labels ``[batch + negatives]``.
    """
    n = train.labels.shape[0]
    rows = torch.randint(n, (batch,), generator=generator)  # [B]
    digits = saturate_ink(train.images[rows], generator, bold_fraction)  # [B, 1, 8, 8]
    neg_rows = torch.randint(n, (negatives,), generator=generator)  # [M]
    sources = saturate_ink(train.images[neg_rows], generator, bold_fraction)  # [M, 1, 8, 8]
    family = torch.randint(len(NEGATIVE_FAMILIES), (negatives,), generator=generator)  # [M]
    every = torch.stack([not_a_digit(sources, train.labels[neg_rows], f, generator) for f in NEGATIVE_FAMILIES])
    negative_images = every[family, torch.arange(negatives)]  # [M, 1, 8, 8]
    labels = torch.cat([train.labels[rows], torch.full((negatives,), NOT_A_DIGIT)])  # [B + M]
    return DigitsData(torch.cat([digits, negative_images]), labels)


def train_classifier(train: DigitsData, *, steps: int, seed: int, hidden: int = CLASSIFIER_HIDDEN, batch: int = 128,
                     negatives: int = 64, lr: float = 2e-3) -> digits_rewards.DigitClassifier:
    """Cross-entropy training of the 11-class digit classifier on ``classifier_batch`` draws (seeded)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        classifier = digits_rewards.DigitClassifier(hidden)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-2)
    for _ in range(steps):
        data = classifier_batch(train, generator, batch, negatives)
        loss = nn.functional.cross_entropy(classifier(data.images), data.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, data: DigitsData) -> float:
    """Fraction of ``data`` whose arg-max logit is the label."""
    return (classifier(data.images).argmax(dim=-1) == data.labels).float().mean().item()


@torch.no_grad()
def negative_rewards(classifier: nn.Module, heldout: DigitsData, seed: int = 0) -> dict[str, float]:
    """Per not-a-digit family, the mean over held-out sources of the largest digit probability.

    That is the most ``digit_classifier`` would pay for such an image under any prompt (softmax over 11 classes).
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for family in NEGATIVE_FAMILIES:
        images = not_a_digit(heldout.images, heldout.labels, family, generator)  # [N, 1, 8, 8]
        probs = classifier(images).softmax(dim=-1)  # [N, 11]
        out[family] = round(probs[:, :NOT_A_DIGIT].amax(dim=-1).mean().item(), 4)
    return out


@torch.no_grad()
def saturated_reward(classifier: nn.Module, heldout: DigitsData, seed: int = 0) -> float:
    """Mean probability of the label on held-out digits with every row saturated (``saturate_ink``, fraction 1)."""
    images = saturate_ink(heldout.images, torch.Generator().manual_seed(seed), fraction=1.0)  # [N, 1, 8, 8]
    probs = classifier(images).softmax(dim=-1)  # [N, 11]
    return probs.gather(1, heldout.labels[:, None]).mean().item()


@torch.no_grad()
def sample_digits(policy: digits_policy.DigitsPolicy, digits: Tensor, *, num_steps: int = 16, shift: float = 3.0,
                  seed: int = 0) -> Tensor:
    """Euler ODE samples of the prompted digits from seeded noise (FLUX grid ``flux_sigmas``).

    Args:
        policy: The digits policy.
        digits: Requested digits ``[N]``.
        num_steps: Euler steps.
        shift: Time shift of the grid.
        seed: Seed of the initial noise.

    Returns:
        Images ``[N, 3, 8, 8]`` in [0, 1].
    """
    prompts = [digit_prompts()[d] for d in digits.tolist()]
    return sample_prompts(policy, prompts, num_steps=num_steps, shift=shift, seed=seed)  # [N, 3, 8, 8]


@torch.no_grad()
def judge_policy(policy: digits_policy.DigitsPolicy, classifier: digits_rewards.DigitClassifier, *,
                 per_digit: int = 50, num_steps: int = 16, shift: float = 3.0, seed: int = 0) -> JudgeResult:
    """Classifier accuracy and reward means on ``per_digit`` ODE samples of each digit."""
    digits = torch.arange(10).repeat_interleave(per_digit)  # [10 * per_digit]
    images = sample_digits(policy, digits, num_steps=num_steps, shift=shift, seed=seed)  # [N, 3, 8, 8]
    predicted = classifier(digits_rewards.classifier_pixels(images)).argmax(dim=-1)  # [N]
    correct = (predicted == digits).float()  # [N]
    prompts = [digit_prompts()[d] for d in digits.tolist()]
    rewards = {
        "digit_classifier": digits_rewards.DigitClassifierReward(classifier)(images, prompts),
        "boldness": digits_rewards.ink_boldness(images),
        "ink_mass": digits_rewards.ink_mass(images),
        "contrast": digits_rewards.ink_contrast(images),
        "brightness": digits_rewards.image_brightness(images),
    }
    return JudgeResult(
        accuracy=correct.mean().item(),
        per_digit=[round(v, 4) for v in correct.view(10, per_digit).mean(dim=1).tolist()],
        reward_means={name: round(value.mean().item(), 4) for name, value in rewards.items()},
    )


def pretrain_digits(out_dir: str | Path, *, steps: int, classifier_steps: int, seed: int = 0, progress: bool = True,
                    judge_per_digit: int = 50) -> PretrainReport:
    """Train and write ``digits_policy.safetensors``, ``digits_classifier.safetensors`` and the report JSON.

    Args:
        out_dir: Output folder (the package's ``assets`` folder for the shipped weights).
        steps: Policy optimizer steps (batch 256).
        classifier_steps: Classifier optimizer steps (128 digits + 64 not-digits a batch).
        seed: Seed of the split-independent training draws (the data split is fixed, seed 0).
        progress: Show progress bars.
        judge_per_digit: ODE samples per digit for the judged accuracy.

    Returns:
        The ``PretrainReport`` that was also written as JSON.
    """
    if steps < 1 or classifier_steps < 1:
        raise ValueError(f"steps and classifier_steps must be >= 1, got {steps} and {classifier_steps}.")
    start = time.perf_counter()
    out = Path(out_dir)
    split = split_digits(load_digits_tensors())
    classifier = train_classifier(split.train, steps=classifier_steps, seed=seed)
    transformer, text_encoder, final_loss = train_policy(split.train, steps=steps, seed=seed, progress=progress)
    policy_path = digits_policy.save_digits_policy(out / digits_policy.POLICY_FILE, transformer, text_encoder)
    classifier_path = digits_rewards.save_digit_classifier(out / digits_rewards.CLASSIFIER_FILE, classifier)
    judged = judge_policy(digits_policy.DigitsPolicy(transformer, text_encoder), classifier,
                          per_digit=judge_per_digit, seed=seed + 2)
    report = PretrainReport(
        policy_path=str(policy_path), classifier_path=str(classifier_path), report_path=str(out / REPORT_FILE),
        classifier_accuracy=round(classifier_accuracy(classifier, split.heldout), 4),
        negative_rewards=negative_rewards(classifier, split.heldout, seed=seed + 3),
        saturated_reward=round(saturated_reward(classifier, split.heldout, seed=seed + 3), 4),
        judged_accuracy=round(judged.accuracy, 4), judged_per_digit=judged.per_digit,
        reward_means=judged.reward_means, final_loss=round(final_loss, 5),
        wall_s=round(time.perf_counter() - start, 1),
    )
    _write_report(out / REPORT_FILE, report, steps=steps, classifier_steps=classifier_steps, seed=seed)
    return report


def _write_report(path: Path, report: PretrainReport, **settings: int) -> None:
    body = {
        "settings": {**settings, "batch": 256, "classifier_batch": 128, "classifier_negatives": 64,
                     "classifier_bold_fraction": 0.5, "heldout_fraction": 0.2, "split_seed": 0,
                     "judge": "Euler ODE, 16 steps, shift 3", "torch": torch.__version__},
        "architecture": {
            "transformer": digits_policy.TRANSFORMER_CONFIG, "text_encoder": digits_policy.TEXT_ENCODER_CONFIG,
            "vocab": list(digits_policy.VOCAB), "max_length": digits_policy.MAX_LENGTH,
            "classifier_hidden": CLASSIFIER_HIDDEN, "classifier_classes": digits_rewards.NUM_CLASSES,
            "negative_families": list(NEGATIVE_FAMILIES),
        },
        "metrics": {k: v for k, v in asdict(report).items() if not k.endswith("_path")},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``flowgrove pretrain digits [--out DIR] [--steps N] [--classifier-steps N] [--seed S] [--quiet]``;
    ``flowgrove pretrain numbers ...`` runs ``pretrain_numbers.main``."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["numbers"]:
        return pretrain_numbers.main(argv[1:])
    parser = argparse.ArgumentParser(prog="flowgrove pretrain", description="Pretrain a built-in task's weights "
                                     "(`flowgrove pretrain numbers --help` for the numbers task).")
    parser.add_argument("task", choices=["digits", "numbers"], help="the built-in task to pretrain")
    parser.add_argument("--out", default=None, help="output folder (default: the package assets folder)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="policy training steps")
    parser.add_argument("--classifier-steps", type=int, default=DEFAULT_CLASSIFIER_STEPS, help="classifier steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--judge-per-digit", type=int, default=50, help="ODE samples per digit for the report")
    args = parser.parse_args(argv)
    report = pretrain_digits(args.out or assets_dir(), steps=args.steps, classifier_steps=args.classifier_steps,
                             seed=args.seed, progress=not args.quiet, judge_per_digit=args.judge_per_digit)
    print(f"pretrained digits in {report.wall_s:.1f} s: classifier held-out accuracy {report.classifier_accuracy:.3f}, "
          f"judged sample accuracy {report.judged_accuracy:.3f}; wrote {Path(report.policy_path).parent}")
    print(f"not-a-digit families get digit_classifier <= {report.negative_rewards}")
    return 0
