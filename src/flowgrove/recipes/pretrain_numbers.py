"""``flowgrove pretrain numbers``: the shipped numbers policy, reproducibly, and the report of its base rewards.

The policy (``policies/numbers.py``: the digits architecture on 8x16 images, vocabulary the/number/0..9) is
trained by rectified flow (``flow_pretrain.train_policy``) on images of the 80 training numbers only, each made of
two real digits of the digits' training split (``tasks/numbers.py``). The 20 test numbers are never shown. The
report JSON records the held-out base rewards that GRPO starts from: on Euler ODE samples of the test numbers (and,
for comparison, of the training numbers) the ``ocr`` reward (the shipped PP-OCRv6 recogniser reading the prompted
number), its exact-read rate and the ``digit_pair`` judge; and the same for real digit pairs of the digits'
held-out split, the ceiling a perfect generator of sklearn-like digits would reach.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from flowgrove.policies import digits as digits_policy
from flowgrove.policies.numbers import NUMBERS, POLICY_FILE
from flowgrove.recipes.flow_pretrain import sample_prompts, train_policy
from flowgrove.rewards.numbers import digit_pair
from flowgrove.rewards.ocr import OcrReward, ocr, target_text
from flowgrove.tasks.digits import DigitsData, assets_dir, load_digits_tensors, split_digits
from flowgrove.tasks.numbers import TEST_NUMBERS, TRAIN_NUMBERS, number_prompt, sample_numbers

DEFAULT_STEPS = 1500
DEFAULT_DATA = 32768  # training images drawn once: random digit pairs of the training numbers
REPORT_FILE = "numbers_pretrain.json"


@dataclass(frozen=True)
class NumbersJudged:
    """Rewards of one image set: the OCR score, the share read exactly as the number, and the digit_pair judge."""

    ocr: float
    exact_read: float
    digit_pair: float


@dataclass(frozen=True)
class NumbersPretrainReport:
    """What ``pretrain_numbers`` wrote and measured."""

    policy_path: str
    report_path: str
    policy_test: NumbersJudged  # base policy, ODE samples of the 20 test numbers (the held-out set)
    policy_train: NumbersJudged  # base policy, ODE samples of the 80 training numbers
    real_test: NumbersJudged  # real digit pairs (digits' held-out split) of the test numbers
    final_loss: float
    wall_s: float


def number_dataset(digits: DigitsData, numbers: tuple[int, ...], count: int, seed: int) -> DigitsData:
    """``count`` training images ``[count, 1, 8, 16]`` of ``numbers``, labels = the numbers (prompt table rows)."""
    data = sample_numbers(digits, numbers, count, torch.Generator().manual_seed(seed))
    return DigitsData(data.images, data.numbers)


@torch.no_grad()
def judge_images(images: Tensor, numbers: Tensor, reader: OcrReward) -> NumbersJudged:
    """Mean ``ocr`` score, exact-read rate and ``digit_pair`` of images ``[N, 3, 8, 16]`` of ``numbers`` ``[N]``."""
    prompts = [number_prompt(n) for n in numbers.tolist()]
    reads = reader.read(images)
    exact = sum(r == target_text(p) for r, p in zip(reads, prompts)) / max(len(prompts), 1)
    return NumbersJudged(ocr=round(reader(images, prompts).mean().item(), 4), exact_read=round(exact, 4),
                         digit_pair=round(digit_pair()(images, prompts).mean().item(), 4))


def judge_numbers_policy(policy: digits_policy.TinyFluxPolicy, numbers: tuple[int, ...], reader: OcrReward, *,
                         per_number: int = 20, seed: int = 0) -> NumbersJudged:
    """``judge_images`` of ``per_number`` Euler ODE samples (16 steps, shift 3, as the evaluation) of each number."""
    chosen = torch.tensor(numbers).repeat_interleave(per_number)  # [N]
    images = sample_prompts(policy, [number_prompt(n) for n in chosen.tolist()], seed=seed)  # [N, 3, 8, 16]
    return judge_images(images, chosen, reader)


def pretrain_numbers(out_dir: str | Path, *, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
                     data_size: int = DEFAULT_DATA, judge_per_number: int = 20) -> NumbersPretrainReport:
    """Train and write ``numbers_policy.safetensors`` and ``numbers_pretrain.json`` into ``out_dir``.

    Args:
        out_dir: Output folder (the package's ``assets`` folder for the shipped weights).
        steps: Policy optimizer steps (batch 256).
        seed: Seed of the training images, initialisation and every draw (the digit and number splits are fixed).
        progress: Show a progress bar.
        data_size: Training images drawn once from the training numbers.
        judge_per_number: ODE samples per number for the report.

    Returns:
        The ``NumbersPretrainReport`` that was also written as JSON.
    """
    if steps < 1 or data_size < 1 or judge_per_number < 1:
        raise ValueError(f"steps, data_size and judge_per_number must be >= 1, got {steps}, {data_size}, {judge_per_number}.")
    start = time.perf_counter()
    out = Path(out_dir)
    split = split_digits(load_digits_tensors())
    train = number_dataset(split.train, TRAIN_NUMBERS, data_size, seed)
    transformer, text_encoder, final_loss = train_policy(train, steps=steps, seed=seed, progress=progress, task=NUMBERS)
    policy_path = digits_policy.save_tiny_policy(out / POLICY_FILE, transformer, text_encoder, NUMBERS)
    policy, reader = digits_policy.TinyFluxPolicy(transformer, text_encoder, task=NUMBERS), ocr()
    real = sample_numbers(split.heldout, TEST_NUMBERS, 10 * judge_per_number, torch.Generator().manual_seed(seed + 3))
    report = NumbersPretrainReport(
        policy_path=str(policy_path), report_path=str(out / REPORT_FILE),
        policy_test=judge_numbers_policy(policy, TEST_NUMBERS, reader, per_number=judge_per_number, seed=seed + 2),
        policy_train=judge_numbers_policy(policy, TRAIN_NUMBERS, reader, per_number=judge_per_number, seed=seed + 2),
        real_test=judge_images(policy.decode(real.images), real.numbers, reader),
        final_loss=round(final_loss, 5), wall_s=round(time.perf_counter() - start, 1),
    )
    _write_report(out / REPORT_FILE, report, steps=steps, seed=seed, data_size=data_size,
                  judge_per_number=judge_per_number)
    return report


def _write_report(path: Path, report: NumbersPretrainReport, **settings: int) -> None:
    body = {
        "settings": {**settings, "batch": 256, "digit_split": "tasks.digits.split_digits (held-out 0.2, seed 0)",
                     "judge": "Euler ODE, 16 steps, shift 3", "torch": torch.__version__},
        "split": {"train_numbers": list(TRAIN_NUMBERS), "test_numbers": list(TEST_NUMBERS)},
        "architecture": {"transformer": digits_policy.TRANSFORMER_CONFIG,
                         "text_encoder": digits_policy.text_encoder_config(NUMBERS), "vocab": list(NUMBERS.vocab),
                         "max_length": NUMBERS.max_length, "latent_shape": list(NUMBERS.latent_shape)},
        "metrics": {k: v for k, v in asdict(report).items() if not k.endswith("_path")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``flowgrove pretrain numbers [--out DIR] [--steps N] [--seed S] [--data N] [--judge-per-number N] [--quiet]``."""
    parser = argparse.ArgumentParser(prog="flowgrove pretrain numbers", description="Pretrain the numbers policy.")
    parser.add_argument("--out", default=None, help="output folder (default: the package assets folder)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="policy training steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--data", type=int, default=DEFAULT_DATA, help="training images drawn once")
    parser.add_argument("--judge-per-number", type=int, default=20, help="ODE samples per number for the report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    report = pretrain_numbers(args.out or assets_dir(), steps=args.steps, seed=args.seed, progress=not args.quiet,
                              data_size=args.data, judge_per_number=args.judge_per_number)
    t = report.policy_test
    print(f"pretrained numbers in {report.wall_s:.1f} s: base policy on the test numbers ocr {t.ocr:.3f} (exact "
          f"{t.exact_read:.3f}), digit_pair {t.digit_pair:.3f}; real digit pairs ocr {report.real_test.ocr:.3f}; "
          f"wrote {Path(report.policy_path).parent}")
    return 0
