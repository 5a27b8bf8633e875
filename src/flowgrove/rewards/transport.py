"""HTTP POST with timeouts, retries and backoff for the rewards that score through a server (stdlib ``urllib``).

Used by ``remote`` (a ``flowgrove serve-reward`` server) and ``vlm_judge`` (an OpenAI-compatible chat endpoint).
Connection errors, timeouts, HTTP 429/5xx and answers the caller's parser rejects are retried with
MixGRPO's backoff ``min(backoff * 2**attempt, 10)`` seconds; other HTTP 4xx answers fail at once. Every
failure ends in one :class:`RewardServerError` line that names the URL, what went wrong and the fix.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Mapping, NamedTuple, TypeVar

from flowgrove.messages import UserFixable

T = TypeVar("T")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BACKOFF = 10.0  # seconds (MixGRPO unified_reward.py)


class RewardServerError(UserFixable, RuntimeError):
    """A reward server is down, too slow, or answers something that cannot be scored."""


class GarbageAnswer(ValueError):
    """Raised by a response parser: the server answered, but not in the expected format."""


class HttpOptions(NamedTuple):
    """How to talk to a reward server."""

    timeout: float = 60.0  # seconds per attempt
    retries: int = 2  # attempts after the first
    backoff: float = 1.0  # seconds before the first retry, doubled per retry, at most 10
    api_key: str | None = None  # sent as "Authorization: Bearer <key>" when set


def check_http_options(options: HttpOptions, who: str) -> HttpOptions:
    """``options`` unchanged, or ``ValueError`` naming the bad field of reward ``who``."""
    if not options.timeout > 0:
        raise ValueError(f"{who}: timeout={options.timeout} must be > 0 seconds.")
    if options.retries < 0 or options.backoff < 0:
        raise ValueError(f"{who}: retries={options.retries} and backoff={options.backoff} must be >= 0.")
    return options


def backoff_delay(attempt: int, base: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0-based): ``min(base * 2**attempt, 10)``."""
    return min(base * 2.0**attempt, MAX_BACKOFF)


def _opener(url: str) -> urllib.request.OpenerDirector:
    """A urllib opener; loopback URLs bypass any http_proxy setting (MixGRPO resets proxies for the same reason)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK else []
    return urllib.request.build_opener(*handlers)


def _headers(content_type: str, options: HttpOptions) -> dict[str, str]:
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    return headers


def _error_text(error: urllib.error.HTTPError) -> str:
    """The server's own error message when it sent ``{"error": ...}``, else the start of the body."""
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return str(error.reason)
    try:
        detail = json.loads(body).get("error", body)
    except (ValueError, AttributeError):
        detail = body
    return " ".join(str(detail).split())[:300] or str(error.reason)


def _attempt(url: str, body: bytes, content_type: str, options: HttpOptions, parse: Callable[[bytes], T]) -> T:
    request = urllib.request.Request(url, data=body, headers=_headers(content_type, options), method="POST")
    with _opener(url).open(request, timeout=options.timeout) as response:
        return parse(response.read())


def post(url: str, body: bytes, content_type: str, options: HttpOptions, parse: Callable[[bytes], T],
         sleep: Callable[[float], None] = time.sleep) -> T:
    """POST ``body`` to ``url`` and return ``parse(answer bytes)``, retrying as the module docstring says.

    Raises:
        RewardServerError: no usable answer after ``1 + options.retries`` attempts, or an HTTP 4xx answer.
    """
    problem = "no attempt was made"
    for attempt in range(options.retries + 1):
        try:
            return _attempt(url, body, content_type, options, parse)
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}: {_error_text(error)}"
            if error.code < 500 and error.code != 429:
                raise RewardServerError(f"{url} refused the request ({problem}); check the URL, model name and key.") from None
        except GarbageAnswer as error:
            problem = f"an answer that cannot be scored ({error})"
        except (socket.timeout, TimeoutError):
            problem = f"no answer within timeout={options.timeout} s"
        except http.client.HTTPException as error:  # a reply cut short (IncompleteRead, BadStatusLine)
            problem = f"a broken HTTP answer ({type(error).__name__})"
        except OSError as error:  # URLError, ConnectionError; a connect timeout arrives as URLError(timeout)
            reason = getattr(error, "reason", error)
            timed_out = isinstance(reason, TimeoutError)
            problem = f"no answer within timeout={options.timeout} s" if timed_out else f"cannot connect ({reason})"
        if attempt < options.retries:
            sleep(backoff_delay(attempt, options.backoff))
    raise RewardServerError(f"{url} gave {problem} after {options.retries + 1} attempt(s); check that the server "
                            "is running and reachable at that URL, or raise timeout= / retries=.")


def get_json(url: str, timeout: float = 5.0) -> Mapping[str, object]:
    """``GET url`` as JSON (health checks). Raises :class:`RewardServerError` with the fix when nothing answers."""
    try:
        with _opener(url).open(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as error:
        raise RewardServerError(f"no reward server answers at {url} ({error}); start one with "
                                "`flowgrove serve-reward NAME --port P` or fix url=.") from None


def check_reachable(url: str, timeout: float, who: str) -> None:
    """Something accepts TCP connections at ``url``'s host and port, else :class:`RewardServerError` naming ``who``'s
    url (a malformed url is a ``ValueError``). Says nothing of the protocol: a server's own errors come later."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{who}: url={url!r} has a port that is not a number in 0..65535; for example "
                         "url=http://127.0.0.1:8000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{who}: url={url!r} is not an http(s)://HOST:PORT address; for example url=http://127.0.0.1:8000")
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise RewardServerError(f"{who}: nothing answers at {url} ({error}); start the server first or fix url=") from None
