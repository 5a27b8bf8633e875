"""``flowgrove serve-reward NAME``: any registered reward behind an HTTP endpoint, for the ``remote`` reward.

Flow-GRPO's reward-server pattern (its DeQA / GenEval servers), with safetensors requests instead of pickles.
Endpoints (stdlib ``ThreadingHTTPServer``):

- ``GET /health`` -> ``{"status": "ok", "reward": NAME}``;
- ``POST /score`` with an ``encode_request`` body (``flowgrove.rewards.remote``) -> ``{"reward": NAME, "scores": [...]}``.

Every error answer is ``{"error": "..."}``: HTTP 401 without the right token (when the server has one, on every
endpoint, /health included, so that the client's start-up check proves the token), 411/400/413 for a missing, bad
or too large ``Content-Length`` (answered before any of the body is read), 503 with ``Retry-After`` when
``max_concurrent`` requests are already in flight, 400 for a request that cannot be read, 500 when the reward raises.

Listening beyond the loopback needs a token (``--token`` or ``$FLOWGROVE_REWARD_TOKEN``). Connections are served
in threads; a request body is read in chunks straight into its image tensor; the reward itself runs one request at
a time (one model, one device).
"""

from __future__ import annotations

import hmac
import json
import socket
import sys
import threading
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

import torch

from flowgrove.rewards import RewardFn, build_reward
from flowgrove.rewards.remote import TOKEN_ENV, ScoreRequest, read_request, shared_token
from flowgrove.rewards.transport import is_loopback, is_number

MAX_REQUEST_BYTES = 1 << 31  # 2 GiB: far above a batch of 1024x1024 float32 images
SOCKET_TIMEOUT = 60.0  # seconds a client may stall one read or write before its connection is dropped
LINGER_BYTES = 1 << 20  # after an error answer, at most this much of an unread body is discarded before closing
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ServeSettings:
    """How ``serve-reward`` listens (its command-line flags)."""

    host: str = "127.0.0.1"  # a non-loopback host (0.0.0.0 serves other machines) needs a token
    port: int = 0  # 0 picks a free port
    token: str | None = None  # the shared secret; None: $FLOWGROVE_REWARD_TOKEN, else no check (loopback only)
    max_concurrent: int = 4  # requests read and scored at once; more get HTTP 503 with Retry-After
    device: str | None = None  # torch device of the reward model and the received images
    verbose: bool = False  # log every request to stderr


def check_settings(settings: ServeSettings) -> ServeSettings:
    """``settings`` with the token read from ``$FLOWGROVE_REWARD_TOKEN`` when none is given; ``ValueError`` names the
    flag to fix (a port outside 0..65535, ``--max-concurrent`` < 1, no token on a non-loopback host)."""
    if not (is_number(settings.port, 0, integer=True) and settings.port <= 65535):
        raise ValueError(f"serve-reward --port {settings.port} is not a port; give 0..65535 (0 picks a free one).")
    if not is_number(settings.max_concurrent, 1, integer=True):
        raise ValueError(f"serve-reward --max-concurrent {settings.max_concurrent} must be an integer >= 1 "
                         "(requests read and scored at once).")
    token = shared_token(settings.token, "serve-reward --token")
    if token is None and not is_loopback(settings.host):
        raise ValueError(f"serve-reward --host {settings.host} lets other machines in; set a shared secret with "
                         f"{TOKEN_ENV}=SECRET (or --token SECRET) and give the remote reward the same token.")
    return replace(settings, token=token)


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant time); always true
    when the server has no token."""
    if token is None:
        return True
    return hmac.compare_digest((header or "").encode("utf-8", "surrogatepass"), f"Bearer {token}".encode())


class Refused(Exception):
    """An HTTP error answer: its status ``code``, a one-line message and extra headers."""

    def __init__(self, code: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.headers = code, dict(headers or {})


def body_size(header: str | None) -> int:
    """The body size a ``Content-Length`` header declares; :class:`Refused` unless it is in 1..MAX_REQUEST_BYTES."""
    if header is None:
        raise Refused(411, "no Content-Length; send the request body with its length (not chunked).")
    try:
        size = int(header)
    except ValueError:
        raise Refused(400, f"Content-Length {header[:40]!r} is not a number of bytes.") from None
    if not 0 < size <= MAX_REQUEST_BYTES:
        raise Refused(400 if size <= 0 else 413, f"Content-Length {size} is not in 1..{MAX_REQUEST_BYTES}; "
                      "send smaller batches (the remote reward's batch_size option).")
    return size


class RewardHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that holds one reward, its name, its settings, a lock around the reward and a
    semaphore of ``max_concurrent`` request slots."""

    daemon_threads = True

    def __init__(self, reward: RewardFn, name: str, settings: ServeSettings) -> None:
        super().__init__((settings.host, settings.port), RewardHandler)
        self.reward, self.reward_name, self.settings = reward, name, settings
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(settings.max_concurrent)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, request: ScoreRequest) -> list[float]:
        """Scores of one request (the reward runs one request at a time)."""
        images = request.images.to(self.settings.device) if self.settings.device else request.images
        with self.lock, torch.no_grad():
            scores = self.reward(images, request.prompts)
        return [float(s) for s in scores.detach().float().cpu().reshape(-1)]


class RewardHandler(BaseHTTPRequestHandler):
    """``/health`` and ``/score`` of a :class:`RewardHTTPServer`."""

    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def _reply(self, code: int, payload: Mapping[str, object], headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if code >= 400:  # an unread or rejected body must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        if code >= 400:
            self._linger()

    def _linger(self) -> None:
        """Stop sending, then discard what the client still sends (at most LINGER_BYTES within LINGER_SECONDS):
        closing a socket with unread data resets the connection, and the client could lose the answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            left = LINGER_BYTES
            while left > 0 and (data := self.connection.recv(min(left, 1 << 16))):
                left -= len(data)
        except OSError:  # the client is gone or slow: close anyway
            pass

    def _answer(self, route: Callable[[], Mapping[str, object]]) -> None:
        """Check the token, then answer ``route()`` as JSON, or its :class:`Refused` as an error."""
        try:
            if not authorized(self.headers.get("Authorization"), self.server.settings.token):
                raise Refused(401, f"missing or wrong token; send the server's --token as 'Authorization: Bearer "
                              f"TOKEN' (the remote reward's token option or ${TOKEN_ENV}).", {"WWW-Authenticate": "Bearer"})
            payload = route()
        except Refused as refusal:
            self._reply(refusal.code, {"error": str(refusal)}, refusal.headers)
            return
        self._reply(200, payload)

    def _health(self) -> Mapping[str, object]:
        if self.path.rstrip("/") != "/health":
            raise Refused(404, f"no such path {self.path}; use GET /health or POST /score.")
        return {"status": "ok", "reward": self.server.reward_name}

    def _score(self) -> Mapping[str, object]:
        if self.path.rstrip("/") != "/score":
            raise Refused(404, f"no such path {self.path}; POST images to /score.")
        size = body_size(self.headers.get("Content-Length"))
        if not self.server.slots.acquire(blocking=False):
            raise Refused(503, f"busy: {self.server.settings.max_concurrent} requests in flight (--max-concurrent); "
                          "retry later.", {"Retry-After": "1"})
        try:
            try:
                request = read_request(self.rfile, size)
            except ValueError as error:
                raise Refused(400, str(error)) from None
            return {"reward": self.server.reward_name, "scores": self._scores(request)}
        finally:
            self.server.slots.release()

    def _scores(self, request: ScoreRequest) -> list[float]:
        """The reward's scores; a ValueError (bad images) is the client's fault (400), anything else the reward's (500)."""
        try:
            return self.server.score(request)
        except ValueError as error:
            raise Refused(400, str(error)) from None
        except Exception as error:  # the reward failed: report it to the client, keep serving
            raise Refused(500, f"reward {self.server.reward_name!r} raised {type(error).__name__}: {error}") from None

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(self._health)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._score)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        if self.server.settings.verbose:
            sys.stderr.write(f"serve-reward: {self.address_string()} {format % args}\n")


def make_server(reward: RewardFn, name: str, settings: ServeSettings = ServeSettings()) -> RewardHTTPServer:
    """A bound (not yet serving) server for ``reward``; port 0 picks a free port (see ``server.url``).

    Raises:
        ValueError: a bad setting (see :func:`check_settings`) or an address that cannot be bound.
    """
    settings = check_settings(settings)
    try:
        return RewardHTTPServer(reward, name, settings)
    except OSError as error:
        raise ValueError(f"serve-reward cannot listen on {settings.host}:{settings.port} ({error.strerror or error}); "
                         "pick another --port (0 picks a free one) or --host.") from None


def serve(name: str, options: Mapping[str, object], settings: ServeSettings = ServeSettings()) -> None:
    """Check ``settings``, build reward ``name`` with ``options`` and serve it until interrupted; prints the URL first."""
    settings = check_settings(settings)  # before the reward model loads
    kwargs = dict(options)
    if settings.device:
        kwargs.setdefault("device", settings.device)
    try:
        reward = build_reward(name, **kwargs)
    except TypeError as error:  # an option the factory does not take
        raise ValueError(f"serve-reward {name}: {error}; `flowgrove rewards` names the rewards, their factories the options.") from None
    server = make_server(reward, name, settings)
    guard = "token required" if settings.token else "no token"
    print(f"serving reward {name!r} on {server.url} (POST /score, GET /health; {guard}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
