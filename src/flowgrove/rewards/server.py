"""``flowgrove serve-reward NAME``: any registered reward behind an HTTP endpoint, for the ``remote`` reward.

Flow-GRPO's reward-server pattern (its DeQA / GenEval servers), with safetensors requests instead of pickles.
Endpoints (stdlib ``ThreadingHTTPServer``):

- ``GET /health`` -> ``{"status": "ok", "reward": NAME}``;
- ``POST /score`` with an ``encode_request`` body (``flowgrove.rewards.remote``) -> ``{"reward": NAME, "scores": [...]}``;
  a request that cannot be read gets HTTP 400, a reward that raises gets HTTP 500, both as ``{"error": "..."}``.

Connections are served in threads; the reward itself runs one request at a time (one model, one device).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping

import torch

from flowgrove.rewards import RewardFn, build_reward
from flowgrove.rewards.remote import decode_request

MAX_REQUEST_BYTES = 1 << 31  # 2 GiB: far above a batch of 1024x1024 float32 images


class RewardHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that holds one reward, its name, its device and a lock around it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward: RewardFn, name: str, device: str | None = None,
                 verbose: bool = False) -> None:
        super().__init__(address, RewardHandler)
        self.reward, self.reward_name, self.device, self.verbose = reward, name, device, verbose
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: bytes) -> list[float]:
        """Scores of one request body; ``ValueError`` when the body is not a valid request."""
        images, prompts = decode_request(body)
        if self.device:
            images = images.to(self.device)
        with self.lock, torch.no_grad():
            scores = self.reward(images, prompts)
        return [float(s) for s in scores.detach().float().cpu().reshape(-1)]


class RewardHandler(BaseHTTPRequestHandler):
    """``/health`` and ``/score`` of a :class:`RewardHTTPServer`."""

    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"

    def _reply(self, code: int, payload: Mapping[str, object]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code >= 400:  # an unread or rejected body must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") != "/health":
            self._reply(404, {"error": f"no such path {self.path}; use GET /health or POST /score."})
            return
        self._reply(200, {"status": "ok", "reward": self.server.reward_name})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"no such path {self.path}; POST images to /score."})
            return
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_REQUEST_BYTES:
            self._reply(400 if size <= 0 else 413, {"error": f"Content-Length {size} is not in 1..{MAX_REQUEST_BYTES}."})
            return
        body = self.rfile.read(size)
        try:
            scores = self.server.score(body)
        except ValueError as error:
            self._reply(400, {"error": str(error)})
            return
        except Exception as error:  # the reward failed: report it to the client, keep serving
            self._reply(500, {"error": f"reward {self.server.reward_name!r} raised {type(error).__name__}: {error}"})
            return
        self._reply(200, {"reward": self.server.reward_name, "scores": scores})

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        if self.server.verbose:
            sys.stderr.write(f"serve-reward: {self.address_string()} {format % args}\n")


def make_server(reward: RewardFn, name: str, host: str = "127.0.0.1", port: int = 0, device: str | None = None,
                verbose: bool = False) -> RewardHTTPServer:
    """A bound (not yet serving) server for ``reward``; ``port`` 0 picks a free port (see ``server.url``)."""
    try:
        return RewardHTTPServer((host, port), reward, name, device, verbose)
    except OSError as error:
        raise ValueError(f"serve-reward cannot listen on {host}:{port} ({error.strerror or error}); pick another "
                         "--port (0 picks a free one) or --host.") from None


def serve(name: str, options: Mapping[str, object], host: str = "127.0.0.1", port: int = 0,
          device: str | None = None, verbose: bool = False) -> None:
    """Build reward ``name`` with ``options`` and serve it until interrupted; prints the URL first."""
    kwargs = dict(options)
    if device:
        kwargs.setdefault("device", device)
    try:
        reward = build_reward(name, **kwargs)
    except TypeError as error:  # an option the factory does not take
        raise ValueError(f"serve-reward {name}: {error}; `flowgrove rewards` names the rewards, their factories the options.") from None
    server = make_server(reward, name, host, port, device, verbose)
    print(f"serving reward {name!r} on {server.url} (POST /score, GET /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
