"""The ocr reward: Flow-GRPO's edit-distance score by hand, greedy CTC, and the real PP-OCRv6 tiny recogniser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowgrove.rewards import build_reward
from flowgrove.rewards.ocr import ctc_greedy, dark_ink, edit_distance, ocr_score, recognizer_input, target_text
from flowgrove.tasks.digits import digit_prompts, load_digits_tensors

pytest.importorskip("onnxruntime")


def render(text: str, height: int = 32, width: int = 96, bright_ink: bool = False) -> torch.Tensor:
    """``text`` in DejaVu Sans (shipped with matplotlib), black on white, as an image ``[3, height, width]``."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), int(height * 0.7))
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - right - left) / 2, (height - bottom - top) / 2), text, fill=0, font=font)
    gray = torch.from_numpy(np.asarray(page, dtype=np.float32) / 255)  # [H, W]
    gray = 1 - gray if bright_ink else gray
    return gray.expand(3, -1, -1)  # [3, H, W]


@pytest.fixture(scope="module")
def ocr():
    return build_reward("ocr")


def test_edit_distance_and_score_by_hand():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    # Flow-GRPO: spaces removed, lower case, 1 if the target is inside, else 1 - min(d, len) / len.
    assert ocr_score("Hello World", "helloworld") == 1.0
    assert ocr_score("xxcatxx", "cat") == 1.0
    assert ocr_score("cot", "cat") == pytest.approx(1 - 1 / 3)
    assert ocr_score("", "cat") == 0.0
    assert ocr_score("a much longer wrong text", "cat") == 0.0  # distance capped at len(target)


def test_target_text_rules():
    assert target_text('a sign that says "Open Late"') == "Open Late"
    assert target_text("a handwritten seven") == "7"
    assert target_text("plain words") == "plain words"
    assert target_text("a handwritten seven", {"a handwritten seven": "VII"}) == "VII"
    assert target_text("the number 47") == "47" and target_text("the number 05") == "05"  # the numbers task
    assert target_text("the number 5") == "the number 5"  # not a numbers prompt: the whole prompt, as before
    assert target_text('the number "12"') == "12"


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    classes = ("", "a", "b")
    # columns: a a blank a b b blank -> "aab"; a repeat separated by a blank counts twice.
    best = torch.tensor([[1, 1, 0, 1, 2, 2, 0]])
    probs = torch.nn.functional.one_hot(best, 3).float()  # [1, 7, 3]
    assert ctc_greedy(probs, classes) == ["aab"]
    # a column whose best probability is below min_prob reads as blank: 0.4 < 0.5 drops the "b" column.
    probs = torch.tensor([[[0.1, 0.9, 0.0], [0.3, 0.3, 0.4]]])
    assert ctc_greedy(probs, classes) == ["ab"] and ctc_greedy(probs, classes, min_prob=0.5) == ["a"]


def test_inputs_are_dark_ink_at_the_recogniser_height():
    white_on_black = torch.zeros(2, 3, 8, 8)
    white_on_black[:, :, 2:6, 3:5] = 1.0
    g = dark_ink(white_on_black)  # auto: a dark border means bright ink, so it is inverted
    assert g[0, 0, 0, 0] == 1.0 and g[0, 0, 3, 3] == 0.0
    x = recognizer_input(torch.rand(2, 3, 16, 40), margin=0.0)
    assert x.shape == (2, 3, 48, 120) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("bright_ink", [False, True])
def test_rendered_word_scores_near_one_and_a_wrong_word_near_zero(ocr, bright_ink):
    words = ["cat", "sun", "map", "pen"]
    images = torch.stack([render(w, bright_ink=bright_ink) for w in words])  # [4, 3, 32, 96]
    assert [t.lower() for t in ocr.read(images)] == words  # c/C, s/S look alike at 32 px; the score lower-cases
    right = ocr(images, [f'a sign that says "{w}"' for w in words])
    wrong = ocr(images, ['a sign that says "box"'] * 4)  # no letter in common with any word: distance 3 of 3
    assert right.dtype == torch.float32 and right.shape == (4,)
    assert right.min() >= 0.99 and wrong.max() <= 0.01


def test_degenerate_images_score_low(ocr):
    g = torch.Generator().manual_seed(0)
    prompts = [digit_prompts()[i % 10] for i in range(20)]
    for images in (torch.zeros(20, 3, 8, 8), torch.ones(20, 3, 8, 8), torch.rand(20, 3, 8, 8, generator=g)):
        assert ocr(images, prompts).mean() <= 0.15
    blank_page = torch.ones(4, 3, 32, 96)
    assert ocr(blank_page, ['a sign that says "cat"'] * 4).max() == 0.0


def test_reads_most_real_digits(ocr):
    data = load_digits_tensors()
    images = ((data.images[:300] + 1) / 2).expand(-1, 3, -1, -1)  # ink bright, as the digits policy draws
    prompts = [digit_prompts()[d] for d in data.labels[:300].tolist()]
    assert ocr(images, prompts).mean() >= 0.8  # measured 0.89 on the first 800


def test_reads_most_real_digit_pairs_of_the_numbers_task(ocr):
    from flowgrove.tasks.digits import split_digits
    from flowgrove.tasks.numbers import TEST_NUMBERS, number_prompt, sample_numbers

    data = sample_numbers(split_digits(load_digits_tensors()).heldout, TEST_NUMBERS, 200, torch.Generator().manual_seed(0))
    images = ((data.images + 1) / 2).expand(-1, 3, -1, -1)  # [200, 3, 8, 16], ink bright
    assert recognizer_input(images).shape == (200, 3, 48, 86)  # 1-px frame: 10x18 -> 48x86
    prompts = [number_prompt(n) for n in data.numbers.tolist()]
    reads = ocr.read(images)
    exact = sum(r == f"{n:02d}" for r, n in zip(reads, data.numbers.tolist())) / 200
    assert exact >= 0.75 and ocr(images, prompts).mean() >= 0.85  # measured: 0.88 exact, 0.94 score on 500 pairs
    assert ocr(images, [number_prompt((n + 11) % 100) for n in data.numbers.tolist()]).mean() <= 0.3  # wrong number


def test_shipped_recogniser_is_the_tinyocr_file_with_its_licence():
    import hashlib

    from flowgrove.rewards.ocr import RECOGNIZER_FILE, RECOGNIZER_SHA256
    from flowgrove.tasks.digits import assets_dir

    assert hashlib.sha256((assets_dir() / RECOGNIZER_FILE).read_bytes()).hexdigest() == RECOGNIZER_SHA256
    assert "Apache License" in (assets_dir() / "PP-OCRv6_rec_tiny.LICENSE").read_text()
    assert "WAS MODIFIED" in (assets_dir() / "PP-OCRv6_rec_tiny.NOTICE").read_text()


def test_factory_validates_options():
    with pytest.raises(ValueError, match="ink="):
        build_reward("ocr", ink="white")
    with pytest.raises(ValueError, match="margin"):
        build_reward("ocr", margin=2.0)
    with pytest.raises(FileNotFoundError, match="weights=<file.onnx>"):
        build_reward("ocr", weights="/nonexistent/rec.onnx")
