"""Hostile clients and poison requests: nothing one client sends takes the
service from the others.

Each case is tried as a hostile client would, against live gateways running
real workers: prompts that cannot fit, schemas the grammar engine cannot
enforce, slow and abandoning clients, a flood of connections under a low
open-file limit, a request that kills whichever worker runs it. The answer
must be a clean error for that client, while both workers stay up (or are
replaced) and /health keeps answering.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

import httpx
import psutil
import pytest

from .conftest import MODEL_NAME, Gateway
from .helpers import wait_until

ALICE, BOB = "alice-key", "bob-key"
MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]
HEALTH_BOUND_S = 0.1  # how fast /health must answer while the service is attacked


def auth(key: str = ALICE) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory):
    """Two workers, two API keys, quick heartbeats."""
    gateway = Gateway(
        tiny_model,
        "--workers",
        "2",
        "--api-key",
        ALICE,
        "--api-key",
        BOB,
        "--heartbeat-interval",
        "1",
        "--heartbeat-timeout",
        "1",
        log=tmp_path_factory.mktemp("hostile") / "gateway.log",
    )
    gateway.wait_ready()
    yield gateway
    kids = gateway.children()
    gateway.stop()
    _, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive


def workers(gw: Gateway) -> list[tuple[int, int]]:
    """(pid, restarts) of each worker."""
    return [(w["pid"], w["restarts"]) for w in gw.health()["workers"]]


def post(gw: Gateway, body: dict, path: str = "/v1/chat/completions", key: str = ALICE, **kw):
    return gw.client.post(path, json={"model": MODEL_NAME, **body}, headers=auth(key), **kw)


class HealthProbe:
    """Polls /health from its own thread; records the slowest answer."""

    def __init__(self, url: str):
        self.url = url
        self.slowest = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                http.get("/health").raise_for_status()
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += 1
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


# --- 1. poison prompts ---------------------------------------------------------------------


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(gw):
    before = workers(gw)
    # 12,000,000 characters: tokenizing it took the worker tens of seconds on
    # the thread that answers heartbeats, and it was killed (three times).
    huge = {"messages": [{"role": "user", "content": "river " * 2_000_000}], "max_tokens": 5}
    with HealthProbe(gw.url) as probe:
        started = time.monotonic()
        r = post(gw, huge, timeout=120)
        took = time.monotonic() - started
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
    assert took < 20
    assert workers(gw) == before  # both alive, none restarted
    print(f"12 MB prompt: {took:.2f}s, slowest /health {probe.slowest * 1000:.0f} ms")
    assert probe.answers > 0 and probe.slowest < HEALTH_BOUND_S * 5, probe.slowest


def test_prompt_token_ids_beyond_the_context_are_refused_at_once(gw):
    r = post(gw, {"prompt": [5] * 100_000, "max_tokens": 5}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# --- 7. schemas the grammar engine cannot enforce --------------------------------------------

SECRET = "SECRET-MARKER-4411"

HOSTILE_SCHEMAS = {
    "self_reference": {"$ref": "#", "description": SECRET},
    "stacked_quantifier": {"type": "string", "pattern": "^a{1000}{1000}$", "description": SECRET},
    "longer_than_the_context": {"type": "string", "pattern": "^(?:a{1000}){1000}$"},
    "not": {"not": {}, "description": SECRET},
    "required_recursion": {
        "type": "object",
        "properties": {"next": {"$ref": "#"}, "note": {"const": SECRET}},
        "required": ["next"],
    },
    "too_deep": json.loads('{"type": "object", "properties": {"a": ' * 80 + "{}" + "}}" * 80),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SCHEMAS))
def test_a_schema_that_cannot_be_enforced_is_a_400_before_generation(gw, name):
    schema = HOSTILE_SCHEMAS[name]
    body = {
        "messages": MESSAGES,
        "max_tokens": 50,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        },
    }
    r = post(gw, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_forced_tool_call_with_an_endless_schema_is_a_400(gw):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        body = {"messages": MESSAGES, "tools": [tool], "tool_choice": choice, "max_tokens": 20}
        r = post(gw, body)
        assert r.status_code == 400, r.text


def test_nothing_of_a_request_reaches_the_logs(gw):
    # Runs after the schema cases: their schemas carried the marker.
    assert SECRET not in gw.log()


# --- 9. error messages name the real cause ------------------------------------------------------


def test_a_stream_on_a_wedged_worker_is_told_it_was_the_heartbeat(gw):
    body = {
        "messages": MESSAGES,
        "max_tokens": 3500,
        "ignore_eos": True,
        "stream": True,
    }
    lines: list[str] = []
    with gw.client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL_NAME, **body},
        headers=auth(),
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 1:
                busy = wait_until(
                    lambda: [w for w in gw.health()["workers"] if w["in_flight"]], 10, "busy"
                )
                os.kill(busy[0]["pid"], signal.SIGSTOP)
    assert lines[-2] == "event: error", lines[-3:]
    message = json.loads(lines[-1].removeprefix("data: "))["error"]["message"]
    assert "heartbeat" in message and "client" not in message
    wait_until(lambda: gw.client.get("/health").status_code == 200, 60, "a replacement")


# --- 4. slow clients under a low open-file limit ----------------------------------------------

FD_LIMIT = 1024
SLOWLORIS = 1100


def _low_fd_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _open_half_requests(url: str, count: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applic")
        socks.append(s)
    return socks


def test_slow_clients_under_a_low_fd_limit_cannot_starve_the_service(start_gateway):
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SLOWLORIS + 200:
        pytest.skip(f"this test opens {SLOWLORIS} sockets; the hard fd limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Without the privilege to raise it, the hard limit stays below the 4096
    # mlx-lm asks for at import, as for an unprivileged service.
    prefix = ()
    if sys.platform.startswith("linux") and shutil.which("setpriv") and os.geteuid() == 0:
        prefix = ("setpriv", "--bounding-set=-sys_resource", "--")
    gw = start_gateway(
        "--workers", "2", "--header-timeout", "3", prefix=prefix, preexec_fn=_low_fd_limit
    )
    assert "mlx-lm asked for 4096" in gw.log() or not prefix
    socks: list[socket.socket] = []
    try:
        socks = _open_half_requests(gw.url, SLOWLORIS)
        (victim, _), _ = workers(gw)
        os.kill(victim, signal.SIGKILL)

        def replaced():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = gw.client.get("/health").json()
                pids = [w["pid"] for w in health["workers"] if w["state"] == "ready"]
                return len(pids) == 2 and victim not in pids

        wait_until(replaced, 60, "the killed worker to be restarted")
        r = post(gw, {"messages": MESSAGES, "max_tokens": 3})
        assert r.status_code == 200, r.text
        # Every slow connection was answered (408 after the header timeout,
        # or 503 at once beyond the cap) and closed.
        answers = {b"408": 0, b"503": 0}
        for s in socks:
            s.settimeout(10)
            head = s.recv(64)
            answers[head[9:12]] = answers.get(head[9:12], 0) + 1
        assert answers[b"408"] > 0 and answers[b"503"] > 0, answers
        assert sum(answers.values()) == SLOWLORIS, answers
    finally:
        for s in socks:
            s.close()
    log = gw.log()
    assert "Too many open files" not in log and "spawn failed" not in log


# --- 9. a worker dies with its gateway, even when stopped ----------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux")
def test_a_stopped_worker_dies_with_a_killed_gateway(start_gateway):
    gw = start_gateway()
    (pid,) = gw.worker_pids()
    worker = psutil.Process(pid)
    os.kill(pid, signal.SIGSTOP)
    gw.proc.kill()
    gw.proc.wait(10)
    # Its stdin closed, but a stopped process cannot see that: only the
    # parent-death signal (SIGKILL) reaches it.
    psutil.wait_procs([worker], timeout=10)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
