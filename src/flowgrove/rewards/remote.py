"""``remote``: score through a ``flowgrove serve-reward`` server, so a big reward model can live on another GPU/machine.

Flow-GRPO's reward-server pattern without pickles or PNG round trips: the client POSTs the images as one
safetensors blob (tensor ``images`` ``[B, 3, H, W]`` or video ``[B, F, 3, H, W]``, the prompts as JSON in the
header metadata) to ``{url}/score``; the server answers ``{"reward": NAME, "scores": [B floats]}``. A batch can
be split into chunks of ``batch_size`` that are sent ``concurrency`` at a time.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor

from flowgrove.rewards.base import register_reward
from flowgrove.rewards.transport import GarbageAnswer, HttpOptions, check_http_options, get_json, post

WIRE_FORMAT = "flowgrove-reward-request-v1"
CONTENT_TYPE = "application/x-safetensors"
URL_ENV = "FLOWGROVE_REWARD_URL"
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode_request(images: Tensor, prompts: Sequence[str], dtype: torch.dtype = torch.float32) -> bytes:
    """Safetensors bytes holding ``images`` (as ``dtype``, on the CPU) and the prompts in the metadata."""
    from safetensors.torch import save

    tensor = images.detach().to("cpu", dtype).contiguous()
    return save({"images": tensor}, metadata={"format": WIRE_FORMAT, "prompts": json.dumps(list(prompts))})


def _metadata(body: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (an 8-byte little-endian header length, then JSON)."""
    if len(body) < 8:
        raise ValueError(f"the request body ({len(body)} bytes) is not safetensors; send encode_request(images, prompts).")
    (size,) = struct.unpack("<Q", body[:8])
    try:
        return json.loads(body[8:8 + size]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise ValueError("the request body has no readable safetensors header; send encode_request(images, prompts).") from None


def decode_request(body: bytes) -> tuple[Tensor, list[str]]:
    """Images (float32) and prompts of an :func:`encode_request` blob; ``ValueError`` names what is wrong."""
    from safetensors.torch import load

    meta = _metadata(body)
    if meta.get("format") != WIRE_FORMAT:
        raise ValueError(f"request format {meta.get('format')!r} is not {WIRE_FORMAT!r}; update the flowgrove client.")
    try:
        images, prompts = load(body)["images"], json.loads(meta["prompts"])
    except Exception as error:  # a corrupt blob raises safetensors' own error types
        raise ValueError(f"the request cannot be read ({type(error).__name__}: {error}).") from None
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)) or len(prompts) != images.shape[0]:
        raise ValueError(f"the request has {images.shape[0]} images but its prompts are not {images.shape[0]} strings.")
    return images.float(), prompts


def parse_scores(body: bytes, count: int) -> list[float]:
    """The ``count`` scores of a server answer, or :class:`GarbageAnswer`. NaN and inf (the server's JSON writes
    them as ``NaN`` / ``Infinity``) are scores: the trainer's non-finite-reward check stops on them, as on a local
    reward's, instead of the client retrying and failing."""
    try:
        scores = json.loads(body)["scores"]
        values = [float(s) for s in scores]
    except (ValueError, KeyError, TypeError):
        raise GarbageAnswer(f"expected JSON {{\"scores\": [{count} numbers]}}, got {body[:80]!r}") from None
    if len(values) != count:
        raise GarbageAnswer(f"expected {count} scores, got {scores[:8]!r}")
    return values


class RemoteReward:
    """A reward scored by a reward server at ``url`` (see the module docstring for the protocol)."""

    def __init__(self, url: str, options: HttpOptions, batch_size: int = 0, concurrency: int = 4,
                 dtype: torch.dtype = torch.float32) -> None:
        self.url, self.options, self.batch_size, self.concurrency, self.dtype = url.rstrip("/"), options, batch_size, concurrency, dtype

    def score_chunk(self, images: Tensor, prompts: Sequence[str]) -> list[float]:
        """Scores of one request."""
        body = encode_request(images, prompts, self.dtype)
        return post(f"{self.url}/score", body, CONTENT_TYPE, self.options, lambda b: parse_scores(b, len(prompts)))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image.")
        size = self.batch_size or max(1, images.shape[0])
        starts = range(0, images.shape[0], size)
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(starts)))) as pool:
            parts = pool.map(lambda i: self.score_chunk(images[i:i + size], prompts[i:i + size]), starts)
            scores = [s for part in parts for s in part]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)  # [B]


@register_reward("remote")
def remote(url: str | None = None, timeout: float = 300.0, retries: int = 2, backoff: float = 1.0,
           batch_size: int = 0, concurrency: int = 4, dtype: str = "float32", api_key: str | None = None,
           check: bool = True, device: str | torch.device | None = None) -> RemoteReward:
    """Any reward served by `flowgrove serve-reward NAME --port P` on another process or machine (url or $FLOWGROVE_REWARD_URL).

    ``check`` asks ``{url}/health`` once, so a server that is not running fails here with the command that starts
    it. ``batch_size`` 0 sends the whole batch in one request. ``device`` is unused (scores follow the images).
    """
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"remote: no url; pass url=http://HOST:PORT or set {URL_ENV} (start the server with "
                         "`flowgrove serve-reward NAME --port PORT`).")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"remote: dtype={dtype!r} is unknown; allowed: {', '.join(WIRE_DTYPES)}.")
    if batch_size < 0 or concurrency < 1:
        raise ValueError(f"remote: batch_size={batch_size} must be >= 0 (0 = whole batch) and concurrency={concurrency} >= 1.")
    options = check_http_options(HttpOptions(timeout, retries, backoff, api_key), "remote")
    reward = RemoteReward(url, options, batch_size, concurrency, WIRE_DTYPES[dtype])
    if check:
        get_json(f"{reward.url}/health", timeout=min(timeout, 10.0))
    return reward
