"""``vlm_judge``: a VLM (UnifiedReward or any other) behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

The server is vLLM or SGLang, e.g. ``vllm serve CodeGoat24/UnifiedReward-2.0-qwen3vl-8b --served-model-name
UnifiedReward --port 8080``. Each image goes out as one chat request (image as a base64 data URL, then the
question built from a template with the caption), ``concurrency`` requests at a time; the answer's
``choices[0].message.content`` is searched with the preset's regex and the number is multiplied by ``scale``.
Presets reproduce the references (rewards.md section 6):

- ``flowgrpo``: Flow-GRPO ``unifiedreward_score_sglang``: ``"<image>\\n"`` + score template, PNG at 512x512,
  ``Final Score: x`` with x in 1-5, reward ``x / 5``;
- ``mixgrpo``: MixGRPO ``unified_reward.py`` "score": element-wise template, JPEG q95, no resize, raw x in 0-5;
- ``mixgrpo_semantic``: MixGRPO "semantic" (its default script): raw ``Alignment Score (1-5): x``.

``failure="raise"`` (default) stops with one clear line when the server is down, too slow or answers something
without a score; ``failure="zero"`` scores such images 0.0 as both references do, but still raises when every
image of a batch failed (a dead server is never a batch of zeros).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from flowgrove.rewards.base import check_reward_inputs, register_reward
from flowgrove.rewards.transport import (GarbageAnswer, HttpOptions, RewardServerError, check_http_options, check_reachable,
                                         check_url, post)

URL_ENV = "FLOWGROVE_JUDGE_URL"
FAILURE_POLICIES = ("raise", "zero")

FLOWGRPO_SCORE_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from 1 "
    "to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
MIXGRPO_SCORE_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text "
    "caption, evaluate their presence in the generated image using the format: 'element (type): value' (where "
    "value=0 means not generated, and value=1 means generated), and assign a score from 1 to 5 after 'Final "
    "Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
MIXGRPO_SEMANTIC_TEMPLATE = (
    "You are presented with a generated image and its associated text caption. Your task is to analyze the image "
    "across multiple dimensions in relation to the caption. Specifically:\n\n1. Evaluate each word in the caption "
    "based on how well it is visually represented in the image. Assign a numerical score to each word using the "
    "format:\n   Word-wise Scores: [[\"word1\", score1], [\"word2\", score2], ..., [\"wordN\", scoreN], "
    "[\"[No_mistakes]\", scoreM]]\n   - A higher score indicates that the word is less well represented in the "
    "image.\n   - The special token [No_mistakes] represents whether all elements in the caption were correctly "
    "depicted. A high score suggests no mistakes; a low score suggests missing or incorrect elements.\n\n2. Provide "
    "overall assessments for the image along the following axes (each rated from 1 to 5):\n- Alignment Score: How "
    "well the image matches the caption in terms of content.\n- Coherence Score: How logically consistent the image "
    "is (absence of visual glitches, object distortions, etc.).\n- Style Score: How aesthetically appealing the "
    "image looks, regardless of caption accuracy.\n\nOutput your evaluation using the format below:\n\n---\n\n"
    "Word-wise Scores: [[\"word1\", score1], ..., [\"[No_mistakes]\", scoreM]]\n\nAlignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\nStyle Score (1-5): Z\n\nYour task is provided as follows:\nText Caption: [{prompt}]"
)


class JudgePreset(NamedTuple):
    """What a reference sends to its judge and how it reads the answer."""

    template: str  # the question; "{prompt}" is replaced by the caption
    pattern: str  # regex whose first group is the score
    scale: float  # reward = score * scale
    image_format: str  # "png" or "jpeg" (quality 95)
    resize: int | None  # square side the image is resized to, None keeps the size
    image_prefix: bool  # put "<image>\n" before the question (Flow-GRPO)
    model: str  # the served model name
    max_tokens: int | None  # None leaves it to the server


PRESETS = {
    "flowgrpo": JudgePreset(FLOWGRPO_SCORE_TEMPLATE, r"Final Score:\s*([1-5](?:\.\d+)?)", 0.2, "png", 512, True,
                            "UnifiedReward-7b-v1.5", None),
    "mixgrpo": JudgePreset(MIXGRPO_SCORE_TEMPLATE, r"Final Score:\s*([0-5](?:\.\d+)?)", 1.0, "jpeg", None, False,
                           "UnifiedReward", 4096),
    "mixgrpo_semantic": JudgePreset(MIXGRPO_SEMANTIC_TEMPLATE, r"Alignment Score \(1-5\):\s*([0-5](?:\.\d+)?)", 1.0,
                                    "jpeg", None, False, "UnifiedReward", 4096),
}


def image_data_url(image: Tensor, image_format: str = "png", resize: int | None = None) -> str:
    """``data:image/<fmt>;base64,...`` of one image ``[3, H, W]`` in [0, 1] (uint8 by rounding, as the references)."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(pixels, "RGB")
    if resize:
        pil = pil.resize((resize, resize), Image.BICUBIC)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=95) if image_format == "jpeg" else pil.save(buffer, format="PNG")
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat_request(preset: JudgePreset, data_url: str, prompt: str, temperature: float = 0.0) -> dict:
    """The ``/v1/chat/completions`` body that asks the judge about one image and its caption."""
    question = preset.template.replace("{prompt}", prompt)
    if preset.image_prefix:
        question = "<image>\n" + question
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}]
    body = {"model": preset.model, "temperature": temperature, "messages": [{"role": "user", "content": content}]}
    if preset.max_tokens:
        body["max_tokens"] = preset.max_tokens
    return body


def parse_score(text: str, pattern: str) -> float | None:
    """The first group of ``pattern`` in ``text`` as a float, None when it does not occur."""
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def parse_answer(body: bytes, pattern: str) -> float:
    """The score in a chat-completions answer, or :class:`GarbageAnswer` saying what was missing."""
    try:
        text = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise GarbageAnswer(f"not a chat completion: {body[:80]!r}") from None
    score = parse_score(str(text), pattern)
    if score is None:
        raise GarbageAnswer(f"no match for {pattern!r} in {' '.join(str(text).split())[:80]!r}")
    return score


class VlmJudge:
    """Scores from a VLM judge server (see the module docstring)."""

    def __init__(self, url: str, preset: JudgePreset, options: HttpOptions, concurrency: int = 8,
                 failure: str = "raise") -> None:
        self.endpoint = url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self.preset, self.options, self.concurrency, self.failure = preset, options, concurrency, failure

    def judge(self, image: Tensor, prompt: str) -> float | None:
        """Raw score of one image, None when it failed and ``failure="zero"``."""
        body = json.dumps(chat_request(self.preset, image_data_url(image, self.preset.image_format, self.preset.resize),
                                       prompt)).encode()
        try:
            return post(self.endpoint, body, "application/json", self.options, lambda b: parse_answer(b, self.preset.pattern))
        except RewardServerError:
            if self.failure == "raise":
                raise
            return None

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts)
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            raw = list(pool.map(self.judge, images, prompts))
        if raw and all(r is None for r in raw):
            raise RewardServerError(f"{self.endpoint}: all {len(raw)} requests of the batch failed; check the judge server.")
        scores = [0.0 if r is None else r * self.preset.scale for r in raw]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)  # [B]


@register_reward("vlm_judge", light=True)
def vlm_judge(url: str | None = None, preset: str = "flowgrpo", model: str | None = None, template: str | None = None,
              pattern: str | None = None, scale: float | None = None, image_format: str | None = None,
              resize: int | None = -1, concurrency: int = 8, timeout: float = 60.0, retries: int = 2,
              backoff: float = 1.0, api_key: str | None = None, failure: str = "raise", check: bool = True,
              device: str | torch.device | None = None) -> VlmJudge:
    """VLM judge over an OpenAI-compatible /v1/chat/completions server (UnifiedReward on vLLM/SGLang; url or $FLOWGROVE_JUDGE_URL).

    ``preset`` (flowgrpo, mixgrpo, mixgrpo_semantic) fills every option left at None (``resize`` -1); ``check``
    connects to the server's host and port once, so a server that is not running fails here, before any model of
    the run loads; ``device`` is unused (scores follow the images).
    """
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"vlm_judge: no url; pass url=http://HOST:PORT or set {URL_ENV} (e.g. a `vllm serve` endpoint).")
    if preset not in PRESETS:
        raise ValueError(f"vlm_judge: preset={preset!r} is unknown; allowed: {', '.join(PRESETS)}.")
    if failure not in FAILURE_POLICIES:
        raise ValueError(f"vlm_judge: failure={failure!r} is unknown; allowed: {', '.join(FAILURE_POLICIES)}.")
    base = PRESETS[preset]
    chosen = base._replace(**{k: v for k, v in dict(model=model, template=template, pattern=pattern, scale=scale,
                                                   image_format=image_format).items() if v is not None})
    chosen = chosen._replace(resize=base.resize if resize == -1 else resize)
    if chosen.image_format not in ("png", "jpeg") or "{prompt}" not in chosen.template or re.compile(chosen.pattern).groups < 1:
        raise ValueError("vlm_judge: image_format must be png or jpeg, template must contain {prompt} and pattern one group.")
    options = check_http_options(HttpOptions(timeout, retries, backoff, api_key), "vlm_judge")
    if check:
        check_reachable(url, min(timeout, 10.0), "vlm_judge")
    return VlmJudge(check_url(url, "vlm_judge"), chosen, options, max(1, concurrency), failure)
