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
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import torch
from torch import Tensor

from flowgrove.rewards.base import register_reward
from flowgrove.rewards.transport import (GarbageAnswer, HttpOptions, check_http_options, check_number, check_url,
                                         get_json, post)

WIRE_FORMAT = "flowgrove-reward-request-v1"
CONTENT_TYPE = "application/x-safetensors"
URL_ENV = "FLOWGROVE_REWARD_URL"
TOKEN_ENV = "FLOWGROVE_REWARD_TOKEN"
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
READ_CHUNK = 1 << 20  # bytes per read of a request body (1 MiB)


def shared_token(token: object, where: str) -> str | None:
    """The shared secret of a reward server and its clients: ``token``, else ``$FLOWGROVE_REWARD_TOKEN``, else None.

    Raises:
        ValueError: naming ``where`` (the option or flag) when it is not printable ASCII without spaces; the
            message never repeats the secret.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None or (isinstance(token, str) and token.isascii() and token.isprintable() and " " not in token):
        return token
    raise ValueError(f"{where} (or ${TOKEN_ENV}) must be printable ASCII without spaces; make one with "
                     "`openssl rand -hex 32` or `python -c 'import secrets; print(secrets.token_hex(32))'`.")


def encode_request(images: Tensor, prompts: Sequence[str], dtype: torch.dtype = torch.float32) -> bytes:
    """Safetensors bytes holding ``images`` (as ``dtype``, on the CPU) and the prompts in the metadata."""
    from safetensors.torch import save

    tensor = images.detach().to("cpu", dtype).contiguous()
    return save({"images": tensor}, metadata={"format": WIRE_FORMAT, "prompts": json.dumps(list(prompts))})


@dataclass(frozen=True)
class ScoreRequest:
    """A request read by the server: float32 images ``[B, 3, H, W]`` (or videos ``[B, F, 3, H, W]``) and B prompts."""

    images: Tensor
    prompts: list[str]


def _fill(stream: BinaryIO, target: memoryview) -> None:
    """Read ``len(target)`` bytes of ``stream`` into ``target``, at most ``READ_CHUNK`` at a time."""
    done = 0
    while done < len(target):
        got = stream.readinto(target[done:done + READ_CHUNK])
        if not got:
            raise ValueError(f"the request ended after {done} of {len(target)} bytes of a part; resend the whole request.")
        done += got


def _read(stream: BinaryIO, count: int) -> bytearray:
    """The next ``count`` bytes of ``stream``."""
    data = bytearray(count)
    _fill(stream, memoryview(data))
    return data


def _header(raw: bytes) -> dict:
    """The JSON header of a safetensors blob, or ``ValueError``."""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError("the request body has no readable safetensors header; send encode_request(images, prompts).")
    return header


def _prompts(header: dict) -> list[str]:
    """The prompts in the ``__metadata__`` of a request header, after checking its wire format."""
    meta = header.get("__metadata__") or {}
    if meta.get("format") != WIRE_FORMAT:
        raise ValueError(f"request format {meta.get('format')!r} is not {WIRE_FORMAT!r}; update the flowgrove client.")
    try:
        prompts = json.loads(meta["prompts"])
    except (KeyError, TypeError, ValueError):
        prompts = None
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise ValueError("the request's prompts are not a JSON list of strings; send encode_request(images, prompts).")
    return prompts


def _empty_images(header: dict, data_bytes: int) -> Tensor:
    """An uninitialised tensor of the dtype and shape of the header's one tensor ``images``, which must fill the
    ``data_bytes`` after the header; else ``ValueError``."""
    entry = header.get("images")
    if set(header) - {"__metadata__", "images"} or not isinstance(entry, dict):
        raise ValueError("the request must hold exactly one tensor, 'images'; send encode_request(images, prompts).")
    dtype, shape = SAFETENSORS_DTYPES.get(entry.get("dtype")), entry.get("shape")
    if dtype is None or not (isinstance(shape, list) and shape and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"the request's images are {entry.get('dtype')!r} {shape!r}; send float32, float16 or "
                         "bfloat16 images [B, 3, H, W] (videos [B, F, 3, H, W]).")
    size = math.prod(shape) * dtype.itemsize
    if entry.get("data_offsets") != [0, size] or data_bytes != size:
        raise ValueError(f"the request's images {shape} need {size} bytes but the body holds {data_bytes}; "
                         "send encode_request(images, prompts) unchanged.")
    return torch.empty(shape, dtype=dtype)


def read_request(stream: BinaryIO, size: int) -> ScoreRequest:
    """Read an :func:`encode_request` blob of ``size`` bytes from ``stream`` (a socket): the header first, checked
    before the tensor bytes are read; then the tensor bytes, chunk by chunk, straight into the image tensor.

    Raises:
        ValueError: what is wrong with the request (the stream may be left part-read).
    """
    if size < 8:
        raise ValueError(f"the request body ({size} bytes) is not safetensors; send encode_request(images, prompts).")
    (header_bytes,) = struct.unpack("<Q", _read(stream, 8))  # safetensors: an 8-byte little-endian header length
    if header_bytes > size - 8:
        raise ValueError(f"the request's safetensors header claims {header_bytes} bytes of a {size}-byte body; "
                         "send encode_request(images, prompts).")
    header = _header(_read(stream, header_bytes))
    prompts = _prompts(header)
    images = _empty_images(header, size - 8 - header_bytes)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"the request has {images.shape[0]} images but {len(prompts)} prompts; send one prompt per image.")
    _fill(stream, memoryview(images.view(-1).view(torch.uint8).numpy()))  # safetensors is little-endian, as our CPUs
    return ScoreRequest(images.float(), prompts)


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


@register_reward("remote", light=True)
def remote(url: str | None = None, timeout: float = 300.0, retries: int = 2, backoff: float = 1.0,
           batch_size: int = 0, concurrency: int = 4, dtype: str = "float32", token: str | None = None,
           check: bool = True, device: str | torch.device | None = None) -> RemoteReward:
    """Any reward served by `flowgrove serve-reward NAME --port P` on another process or machine (url or $FLOWGROVE_REWARD_URL).

    ``token`` (or ``$FLOWGROVE_REWARD_TOKEN``) is the server's ``--token``, sent as ``Authorization: Bearer``.
    ``check`` asks ``{url}/health`` once, so a server that is not running, or a missing or wrong token, fails here
    with the fix. ``batch_size`` 0 sends the whole batch in one request. ``device`` is unused (scores follow the images).
    """
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"remote: no url; pass url=http://HOST:PORT or set {URL_ENV} (start the server with "
                         "`flowgrove serve-reward NAME --port PORT`).")
    url = check_url(url, "remote")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"remote: dtype={dtype!r} is unknown; allowed: {', '.join(WIRE_DTYPES)}.")
    check_number("remote", "batch_size", batch_size, 0, integer=True)  # 0 = the whole batch
    check_number("remote", "concurrency", concurrency, 1, integer=True)
    key_hint = f"token= (or ${TOKEN_ENV}) to the server's --token"
    options = HttpOptions(timeout, retries, backoff, shared_token(token, "remote: token"), key_hint)
    reward = RemoteReward(url, check_http_options(options, "remote"), batch_size, concurrency, WIRE_DTYPES[dtype])
    if check:
        get_json(f"{reward.url}/health", options._replace(timeout=min(timeout, 10.0)))
    return reward
