"""End to end: stopping the gateway drains in-flight work and leaves no worker behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from .conftest import MODEL_NAME
from .helpers import wait_until
from .test_robustness import faulty_python

MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]


def stream_all(url: str, max_tokens: int, out: list, first_chunk: threading.Event) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    lines = []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()
    except httpx.HTTPError as exc:
        lines.append(f"transport error: {exc}")
    out.append(lines)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_streams_then_stops_workers(start_gateway, sig):
    gw = start_gateway("--workers", "2", "--shutdown-grace", "30")
    workers = [psutil.Process(pid) for pid in gw.worker_pids()]
    assert len(workers) == 2
    results: list = []
    started = [threading.Event() for _ in range(4)]
    threads = [
        threading.Thread(target=stream_all, args=(gw.url, 600, results, started[i]))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30)
    gw.proc.send_signal(sig)
    # new connections are refused while the old ones finish
    wait_until(lambda: _refused(gw.url), 10, "the listener to close")
    for t in threads:
        t.join(60)
    assert len(results) == 4
    for lines in results:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"completion_tokens":600' in lines[-2]
    # uvicorn re-raises the signal once it has shut down cleanly
    assert gw.proc.wait(30) in (0, 130, -sig)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    log = gw.log()
    assert "Finished server process" in log
    assert "Traceback" not in log


def test_ctrl_c_at_a_terminal_stops_the_body_scanner_quietly(start_gateway):
    """A terminal's Ctrl-C signals the whole foreground process group, the
    body scanner (started by a body of too many values) included: the
    gateway shuts down and the scanner leaves without a traceback."""
    gw = start_gateway(preexec_fn=os.setsid)  # a process group of its own, as a shell gives
    values = b",".join([b"0"] * 300_000)
    body = b'{"model": "%s", "messages": [], "junk": [%s]}' % (MODEL_NAME.encode(), values)
    r = gw.client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    (scanner,) = [p for p in gw.children() if "gateway.bodyscan" in p.cmdline()]
    os.killpg(gw.proc.pid, signal.SIGINT)
    assert gw.proc.wait(30) in (0, 130, -signal.SIGINT)
    _, alive = psutil.wait_procs([scanner], timeout=10)
    assert not alive
    log = gw.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-2000:]


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def test_grace_period_bounds_the_drain(start_gateway, tmp_path):
    # The slow worker makes the 2,000-token reply last 40 s: it cannot
    # finish within the 2 s grace, however fast the machine.
    gw = start_gateway("--shutdown-grace", "2", "--worker-python", faulty_python(tmp_path, "slow"))
    results: list = []
    first = threading.Event()
    t = threading.Thread(target=stream_all, args=(gw.url, 2000, results, first))
    t.start()
    assert first.wait(30)
    (pid,) = gw.worker_pids()
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(30)
    took = time.monotonic() - started
    t.join(30)
    assert took < 15, f"shutdown took {took:.1f}s with a 2 s grace period"
    assert results and results[0][-1] != "data: [DONE]"  # cut off at the deadline
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_second_ctrl_c_ends_the_grace_cleanly(start_gateway, tmp_path):
    """Ctrl-C twice: in-flight streams end with an error event and the
    gateway's own shutdown runs, instead of uvicorn cutting everything."""
    gw = start_gateway(
        "--shutdown-grace",
        "60",
        "--worker-python",
        faulty_python(tmp_path, "slow"),
        preexec_fn=os.setsid,
    )
    workers = [psutil.Process(pid) for pid in gw.worker_pids()]
    results: list = []
    first = threading.Event()
    t = threading.Thread(target=stream_all, args=(gw.url, 2000, results, first))
    t.start()
    assert first.wait(30)
    os.killpg(gw.proc.pid, signal.SIGINT)
    time.sleep(1)
    started = time.monotonic()
    os.killpg(gw.proc.pid, signal.SIGINT)
    assert gw.proc.wait(30) in (0, 130, -signal.SIGINT)
    assert time.monotonic() - started < 15, "the second Ctrl-C did not end the 60 s grace"
    t.join(30)
    lines = results[0]
    assert lines[-2] == "event: error" and "shutting_down" in lines[-1], lines[-3:]
    log = gw.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "Application shutdown complete" in log
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_sigkilled_gateway_leaves_no_worker_alive(start_gateway):
    gw = start_gateway("--workers", "2")
    workers = [psutil.Process(pid) for pid in gw.worker_pids()]
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    # workers notice their stdin closing and exit by themselves
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers: {alive}"


def test_a_worker_deaf_to_every_request_to_stop_is_sigkilled(start_gateway, tmp_path):
    """shutdown RPC, then stdin closed, then SIGTERM after 5 s, then SIGKILL
    after 5 s more: the worker ignores all but the last."""
    gw = start_gateway("--worker-python", faulty_python(tmp_path, "deaf"))
    (pid,) = gw.worker_pids()
    worker = psutil.Process(pid)
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(60) in (0, -signal.SIGTERM)
    # Only SIGKILL can have ended it: it ignores SIGTERM and its stdin closing.
    _, alive = psutil.wait_procs([worker], timeout=10)
    assert not alive
    log = gw.log()
    steps = [
        "fault: ignoring shutdown",
        "fault: ignoring the end of stdin",
        "still running 5s after stdin closed; SIGTERM",
        "fault: ignoring SIGTERM",
        "still running 5s after SIGTERM; SIGKILL",
    ]
    at = [log.find(step) for step in steps]
    assert all(i >= 0 for i in at), dict(zip(steps, at, strict=True))
    assert at == sorted(at), dict(zip(steps, at, strict=True))
