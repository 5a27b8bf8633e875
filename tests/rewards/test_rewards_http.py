"""HTTP rewards against real servers on 127.0.0.1: a stdlib judge for ``vlm_judge``, the real serve-reward for ``remote``."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from flowgrove import cli
from flowgrove.rewards import build_reward, reward_names
from flowgrove.rewards.remote import TOKEN_ENV, encode_request, read_request
from flowgrove.rewards.scoring import score_rewards
from flowgrove.rewards.server import MAX_REQUEST_BYTES, ServeSettings, make_server
from flowgrove.rewards.transport import RewardServerError, backoff_delay, is_loopback

FAST = {"timeout": 2.0, "retries": 0, "backoff": 0.0}


class Judge(BaseHTTPRequestHandler):
    """Plays a UnifiedReward server: ``Final Score: 1 + 4 * mean red`` of the image, or a configured failure."""

    def do_POST(self):  # noqa: N802
        from PIL import Image

        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state["lock"]:
            state["requests"].append((self.path, dict(self.headers), body))
            count = len(state["requests"])
        mode = state["mode"]
        if mode == "slow":
            time.sleep(1.0)
        if mode == "flaky" and count <= 2:
            return self._send(500, b'{"error": "warming up"}')
        content = body["messages"][0]["content"]
        url, text = content[0]["image_url"]["url"], content[1]["text"]
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        red = float(np.asarray(image)[..., 0].mean()) / 255
        caption = re.search(r"Text Caption: \[(.*)\]", text).group(1)
        answer = f"{caption}: fine.\nFinal Score: {1 + 4 * red:.3f}"
        if mode == "garbage" or (mode == "garbage_for_cats" and "cat" in caption):
            answer = "I would rather not rate this image."
        if mode == "not_json":
            return self._send(200, b"<html>502 Bad Gateway</html>")
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def serving(server):
    """Serve ``server`` in a daemon thread, then shut it down and close its socket."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def judge(mode="ok"):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.state = {"mode": mode, "requests": [], "lock": threading.Lock()}
    with serving(server) as url:
        yield url, server.state


def red_images(levels):
    """Images ``[B, 3, 8, 8]`` whose red channel is ``level`` and green/blue 0."""
    images = torch.zeros(len(levels), 3, 8, 8)
    images[:, 0] = torch.tensor(levels)[:, None, None]
    return images


def test_vlm_judge_flowgrpo_preset_scores_and_sends_the_reference_request():
    levels, prompts = [0.0, 0.5, 1.0, 0.25], ["a red square", "a cat", "a dog", "a sky"]
    with judge() as (url, state):
        scores = build_reward("vlm_judge", url=url + "/v1", api_key="k", **FAST)(red_images(levels), prompts)
    # Final Score = 1 + 4 * red (PNG is lossless; uint8 rounding moves 0.5 and 0.25 by < 1/255); reward = score / 5.
    torch.testing.assert_close(scores, (1 + 4 * torch.tensor(levels)) / 5, atol=4 / 255 / 5, rtol=0)
    assert len(state["requests"]) == 4
    path, headers, body = state["requests"][0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "UnifiedReward-7b-v1.5" and body["temperature"] == 0 and "max_tokens" not in body
    url0, text = body["messages"][0]["content"][0]["image_url"]["url"], body["messages"][0]["content"][1]["text"]
    assert url0.startswith("data:image/png;base64,") and text.startswith("<image>\nYou are given a text caption")
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(url0.split(",", 1)[1]))).size == (512, 512)


def test_vlm_judge_mixgrpo_preset_is_raw_jpeg_without_prefix():
    with judge() as (url, state):
        scores = build_reward("vlm_judge", url=url, preset="mixgrpo", **FAST)(red_images([1.0, 0.0]), ["a", "b"])
    torch.testing.assert_close(scores, torch.tensor([5.0, 1.0]), atol=0.05, rtol=0)  # JPEG moves 255 to about 254
    body = state["requests"][0][2]
    assert body["model"] == "UnifiedReward" and body["max_tokens"] == 4096
    text = body["messages"][0]["content"][1]["text"]
    assert not text.startswith("<image>") and "'element (type): value'" in text
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_vlm_judge_garbage_answers_raise_or_score_zero():
    images, prompts = red_images([1.0, 1.0]), ["a cat", "a dog"]
    with judge("garbage") as (url, _):
        with pytest.raises(RewardServerError, match="cannot be scored.*no match for"):
            build_reward("vlm_judge", url=url, **FAST)(images, prompts)
        with pytest.raises(RewardServerError, match="all 2 requests"):  # a batch of zeros would hide a broken judge
            build_reward("vlm_judge", url=url, failure="zero", **FAST)(images, prompts)
    with judge("not_json") as (url, _):
        with pytest.raises(RewardServerError, match="not a chat completion"):
            build_reward("vlm_judge", url=url, **FAST)(images, prompts)
    with judge("garbage_for_cats") as (url, _):
        scores = build_reward("vlm_judge", url=url, failure="zero", **FAST)(images, prompts)
    assert scores[0] == 0.0 and scores[1] == pytest.approx(1.0)


def test_vlm_judge_timeout_retries_and_a_dead_server():
    images = red_images([1.0])
    with judge("slow") as (url, state):
        start = time.perf_counter()
        with pytest.raises(RewardServerError, match=r"no answer within timeout=0.2 s after 2 attempt"):
            build_reward("vlm_judge", url=url, timeout=0.2, retries=1, backoff=0.0)(images, ["x"])
        assert time.perf_counter() - start < 1.5 and len(state["requests"]) == 2
    with judge("flaky") as (url, state):  # two HTTP 500s, then answers: retried with backoff
        assert build_reward("vlm_judge", url=url, retries=2, backoff=0.0)(images, ["x"]).item() == pytest.approx(1.0)
        assert len(state["requests"]) == 3
    with judge() as (url, _):
        pass  # the port is closed now
    with pytest.raises(RewardServerError, match=r"vlm_judge: nothing answers at http://127\.0\.0\.1:\d+.*start the server"):
        build_reward("vlm_judge", url=url, **FAST)  # found when the reward is built, before any model of a run loads
    with pytest.raises(RewardServerError, match="cannot connect.*check that the server is running"):
        build_reward("vlm_judge", url=url, check=False, **FAST)(images, ["x"])  # a server that dies mid-run
    assert [backoff_delay(a, 1.0) for a in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_vlm_judge_option_errors():
    with pytest.raises(ValueError, match="no url"):
        build_reward("vlm_judge")
    with pytest.raises(ValueError, match="preset="):
        build_reward("vlm_judge", url="http://127.0.0.1:1", preset="pickscore")
    with pytest.raises(ValueError, match="template must contain"):
        build_reward("vlm_judge", url="http://127.0.0.1:1", template="rate it")


@pytest.fixture(scope="module")
def brightness_server():
    """The real `flowgrove serve-reward brightness` in a subprocess; yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "flowgrove", "serve-reward", "brightness", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, f"serve-reward printed {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_remote_matches_the_local_reward(brightness_server):
    images = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = [f"p{i}" for i in range(10)]
    local = build_reward("brightness")(images, prompts)
    remote = build_reward("remote", url=brightness_server)
    torch.testing.assert_close(remote(images, prompts), local, atol=0, rtol=0)  # float32 on the wire: exact
    chunked = build_reward("remote", url=brightness_server, batch_size=3, concurrency=3, dtype="float16")
    torch.testing.assert_close(chunked(images, prompts), local, atol=1e-3, rtol=0)  # 4 requests, 3 at a time
    with urllib.request.urlopen(brightness_server + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok", "reward": "brightness"}  # no token on the loopback


def test_serve_reward_rejects_bad_requests_and_reports_reward_errors():
    def broken(images, prompts):
        raise RuntimeError("model exploded")

    with serving(make_server(broken, "broken")) as url:
        request = urllib.request.Request(url + "/score", data=b"not safetensors at all", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request)
        assert info.value.code == 400 and "safetensors" in json.loads(info.value.read())["error"]
        with pytest.raises(RewardServerError, match="HTTP 500: reward 'broken' raised RuntimeError: model exploded"):
            build_reward("remote", url=url, **FAST)(torch.zeros(1, 3, 4, 4), ["x"])
        body = encode_request(torch.zeros(2, 3, 4, 4), ["only one prompt", "x"])[:-8]  # truncated tensor data
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url + "/score", data=body, method="POST"))
        assert info.value.code == 400


class Garbage(BaseHTTPRequestHandler):
    """A reward server that is healthy but answers scores it cannot have computed."""

    def do_GET(self):  # noqa: N802
        self._send(b'{"status": "ok", "reward": "x"}')

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(b'{"scores": [0.5]}' if self.server.mode == "short" else b'{"score": "high"}')

    def _send(self, data):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode,message", [("short", "expected 2 scores"), ("keys", "expected JSON")])
def test_remote_garbage_answers_and_missing_servers(mode, message):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    server.mode = mode
    with serving(server) as url:
        with pytest.raises(RewardServerError, match=message):
            build_reward("remote", url=url, **FAST)(torch.zeros(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(RewardServerError, match="no reward server answers.*serve-reward"):
        build_reward("remote", url=url)
    with pytest.raises(ValueError, match="FLOWGROVE_REWARD_URL"):
        build_reward("remote")


def test_remote_times_out():
    def slow(images, prompts):
        time.sleep(1.0)
        return images.mean(dim=(1, 2, 3))

    with serving(make_server(slow, "slow")) as url:
        with pytest.raises(RewardServerError, match="no answer within timeout=0.2 s"):
            build_reward("remote", url=url, timeout=0.2, retries=0)(torch.zeros(1, 3, 4, 4), ["x"])


def test_remote_carries_videos():
    video = build_reward("video", reward="brightness", frames=2, reduce="min")
    clips = torch.rand(3, 5, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # [B, F, 3, H, W]
    with serving(make_server(video, "video")) as url:
        torch.testing.assert_close(build_reward("remote", url=url)(clips, ["a", "b", "c"]), video(clips, ["a", "b", "c"]))


def test_several_rewards_are_scored_in_parallel_threads():
    def slow(value):
        def reward(images, prompts):
            time.sleep(0.4)
            return torch.full((images.shape[0],), value, requires_grad=torch.is_grad_enabled())

        return reward

    images = torch.zeros(2, 3, 4, 4)
    start = time.perf_counter()
    with torch.no_grad():
        scores = score_rewards({"a": slow(1.0), "b": slow(2.0), "c": slow(3.0)}, images, ["x", "y"])
    assert time.perf_counter() - start < 1.0  # 3 x 0.4 s one after the other would take 1.2 s
    assert [s.tolist() for s in scores] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    assert not any(s.requires_grad for s in scores)  # no_grad of the caller holds inside the threads


def test_rewards_command_lists_every_reward_once(capsys):
    assert cli.main(["rewards"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == reward_names()
    from flowgrove.rewards.base import reward_factory

    shipped = [line for line in lines if reward_factory(line.split()[0]).__module__.startswith("flowgrove.")]
    assert all(len(line.split()) > 1 for line in shipped)  # each shipped reward has a summary (tests register bare ones)
    assert {"ocr", "vlm_judge", "remote", "video"} <= set(reward_names())


def test_a_training_step_scores_two_remote_rewards_at_once():
    from conftest import TinyPolicy

    from flowgrove.config.load import load_config
    from flowgrove.training.trainer import GRPOTrainer

    def slow_brightness(images, prompts):
        time.sleep(0.4)
        return images.float().mean(dim=(1, 2, 3))

    overrides = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000"]
    cfg = load_config(None, overrides, method="dancegrpo")
    cfg.rewards = {"a": 1.0, "b": 0.5}
    with serving(make_server(slow_brightness, "a")) as url_a, serving(make_server(slow_brightness, "b")) as url_b:
        rewards = {"a": build_reward("remote", url=url_a), "b": build_reward("remote", url=url_b)}
        metrics = GRPOTrainer(cfg, TinyPolicy(), rewards, ["zero", "one", "two"]).step()
    assert metrics["reward/a"] == metrics["reward/b"]
    assert 0.4 <= metrics["seconds_reward"] < 0.75  # in sequence it would be at least 0.8 s


def test_serve_reward_start_up_errors_are_one_line(monkeypatch):
    from flowgrove.rewards import server as reward_server

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with serving(make_server(build_reward("brightness"), "brightness")) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}.*pick another --port"):
            make_server(build_reward("brightness"), "brightness", ServeSettings(port=port))
    with pytest.raises(ValueError, match="serve-reward brightness: .*unexpected keyword argument 'gain'"):
        reward_server.serve("brightness", {"gain": 2})
    for port in (70000, -1):
        with pytest.raises(ValueError, match=f"--port {port} is not a port; give 0..65535"):
            make_server(build_reward("brightness"), "brightness", ServeSettings(port=port))
    with pytest.raises(ValueError, match="--max-concurrent 0 must be an integer >= 1"):
        make_server(build_reward("brightness"), "brightness", ServeSettings(max_concurrent=0))


class Counting:
    """A reward that counts its calls and, when ``gate`` is set, blocks inside until it is opened."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls, self.gate, self.entered = 0, gate, threading.Event()

    def __call__(self, images, prompts):
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=10)
        return images.mean(dim=(1, 2, 3))


def raw_post(url, body, headers=None):
    """``POST url`` with urllib: ``(HTTP status, JSON answer, answer headers)``, error statuses included."""
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_a_token_keeps_out_requests_without_it(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    reward, images, prompts = Counting(), torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(2)), ["a", "b", "c"]
    body = encode_request(images, prompts)
    with serving(make_server(reward, "count", ServeSettings(token="s3cret-token"))) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Bearer s3cret-token "}):
            code, answer, sent = raw_post(url + "/score", body, headers)
            assert code == 401 and "missing or wrong token" in answer["error"] and sent["WWW-Authenticate"] == "Bearer"
        with pytest.raises(urllib.error.HTTPError, match="401"):  # /health too: the client's check proves the token
            urllib.request.urlopen(url + "/health", timeout=10)
        for token in (None, "wrong"):  # the remote reward's start-up check fails with the option to set
            with pytest.raises(RewardServerError, match=r"refused the credentials \(HTTP 401.*set token= \(or "
                               r"\$FLOWGROVE_REWARD_TOKEN\) to the server's --token"):
                build_reward("remote", url=url, token=token, **FAST)
        unchecked = build_reward("remote", url=url, token="wrong", check=False, **FAST)
        with pytest.raises(RewardServerError, match="HTTP 401.*set token="):
            unchecked(images, prompts)
        assert reward.calls == 0  # nothing was scored
        code, answer, _ = raw_post(url + "/score", body, {"Authorization": "Bearer s3cret-token"})
        assert code == 200 and answer["scores"] == pytest.approx(images.mean(dim=(1, 2, 3)).tolist())
        torch.testing.assert_close(build_reward("remote", url=url, token="s3cret-token")(images, prompts), images.mean(dim=(1, 2, 3)))
        monkeypatch.setenv(TOKEN_ENV, "s3cret-token")  # the client falls back to the environment variable
        torch.testing.assert_close(build_reward("remote", url=url)(images, prompts), images.mean(dim=(1, 2, 3)))
        assert reward.calls == 3


def test_serving_beyond_the_loopback_needs_a_token(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "", "10.1.2.3", "reward-host"):
        with pytest.raises(ValueError, match=f"--host {host} lets other machines in; set a shared secret with "
                           f"{TOKEN_ENV}=SECRET \\(or --token SECRET\\)"):
            make_server(build_reward("brightness"), "brightness", ServeSettings(host=host))
    # checked before the reward is built: an unknown reward name does not get that far
    assert cli.main(["serve-reward", "no_such_reward", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token" in err and TOKEN_ENV in err
    with pytest.raises(ValueError, match=r"--token \(or \$FLOWGROVE_REWARD_TOKEN\) must be printable ASCII") as info:
        make_server(build_reward("brightness"), "brightness", ServeSettings(host="0.0.0.0", token="two words"))
    assert "two words" not in str(info.value)  # a secret is never echoed
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    server = make_server(build_reward("brightness"), "brightness", ServeSettings(host="0.0.0.0"))
    server.server_close()
    assert server.settings.token == "from-the-environment"
    for host in ("127.0.0.1", "127.0.0.2", "localhost"):
        assert is_loopback(host)
    assert not any(is_loopback(host) for host in ("0.0.0.0", "", "::", "10.0.0.1", "reward-host"))


def test_bad_lengths_are_refused_before_the_body_is_read():
    reward = Counting()
    with serving(make_server(reward, "count")) as url:
        port = int(url.rsplit(":", 1)[1])
        for length, code in ((str(MAX_REQUEST_BYTES + 1), 413), ("0", 400), ("many", 400), (None, 411)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.putrequest("POST", "/score")
            if length is not None:
                connection.putheader("Content-Length", length)
            connection.endheaders()  # no body follows: an answer proves the server did not wait for one
            start = time.perf_counter()
            response = connection.getresponse()
            assert response.status == code and "error" in json.loads(response.read())
            assert time.perf_counter() - start < 1.0 and response.getheader("Connection") == "close"
            connection.close()
    assert reward.calls == 0


def test_requests_beyond_max_concurrent_get_503_with_retry_after():
    gate = threading.Event()
    reward = Counting(gate)
    images, prompts = torch.rand(2, 3, 4, 4), ["a", "b"]
    with serving(make_server(reward, "blocked", ServeSettings(max_concurrent=1))) as url:
        first = {}
        thread = threading.Thread(target=lambda: first.update(scores=build_reward("remote", url=url)(images, prompts)))
        thread.start()
        try:
            assert reward.entered.wait(timeout=10)  # the first request holds the only slot
            code, answer, headers = raw_post(url + "/score", encode_request(images, prompts))
            assert code == 503 and "--max-concurrent" in answer["error"] and headers["Retry-After"] == "1"
            with pytest.raises(RewardServerError, match="HTTP 503: busy"):
                build_reward("remote", url=url, **FAST)(images, prompts)
        finally:
            gate.set()
            thread.join(timeout=10)
        torch.testing.assert_close(first["scores"], images.mean(dim=(1, 2, 3)))
        code, _, _ = raw_post(url + "/score", encode_request(images, prompts))  # the slot is free again
        assert code == 200 and reward.calls == 2


def test_a_request_is_read_header_first():
    images = torch.rand(2, 3, 4, 4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        body = encode_request(images, ["a", "b"], dtype)
        request = read_request(io.BytesIO(body), len(body))
        torch.testing.assert_close(request.images, images.to(dtype).float(), atol=0, rtol=0)
        assert request.prompts == ["a", "b"] and request.images.dtype == torch.float32
    body = encode_request(torch.rand(64, 3, 32, 32), ["p"] * 64)
    (header_bytes,) = struct.unpack("<Q", body[:8])
    stream = io.BytesIO(body[:8 + header_bytes + 100])  # the header, then only 100 of the tensor bytes
    with pytest.raises(ValueError, match="need 786432 bytes but the body holds 100"):
        read_request(stream, 8 + header_bytes + 100)
    assert stream.tell() == 8 + header_bytes  # refused before reading any tensor bytes
    with pytest.raises(ValueError, match="ended after 100 of 786432 bytes"):  # a client that stops sending
        read_request(io.BytesIO(body[:8 + header_bytes + 100]), len(body))
    with pytest.raises(ValueError, match="has 64 images but 1 prompts"):
        bad = encode_request(torch.rand(64, 3, 32, 32), ["p"])
        read_request(io.BytesIO(bad), len(bad))
    with pytest.raises(ValueError, match="exactly one tensor"):
        from safetensors.torch import save

        two = save({"images": images, "extra": images.clone()}, metadata={"format": "flowgrove-reward-request-v1", "prompts": "[]"})
        read_request(io.BytesIO(two), len(two))


@pytest.mark.parametrize("options,message", [
    ({"timeout": "abc"}, r"remote: timeout='abc' must be a number > 0; fix the timeout option \(reward_options.remote.timeout\)"),
    ({"timeout": 0}, "timeout=0 must be a number > 0"),
    ({"retries": 1.5}, "retries=1.5 must be an integer >= 0"),
    ({"backoff": None}, "backoff=None must be a number >= 0"),
    ({"batch_size": "8"}, "batch_size='8' must be an integer >= 0"),
    ({"concurrency": 0}, "concurrency=0 must be an integer >= 1"),
    ({"url": "reward-host:18085"}, r"url='reward-host:18085' is not an http\(s\)://HOST:PORT address; give e.g. url=http://"),
    ({"url": "http://reward-host:70000"}, "url='http://reward-host:70000' is not an http"),
    ({"url": "http://:8080"}, "is not an http"),
    ({"url": 8080}, "url=8080 is not an http"),
    ({"token": 12345}, r"remote: token \(or \$FLOWGROVE_REWARD_TOKEN\) must be printable ASCII"),
])
def test_remote_option_errors_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        build_reward("remote", **{"url": "http://127.0.0.1:1", "check": False, **options})
