"""Test helpers: bounded waiting, and a worker process driven over its pipes."""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll until predicate() is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerPipe:
    """A real `python -m worker` process; frames are read by a thread."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--log-level", "warning", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.frames: queue.Queue = queue.Queue()
        self.raw_lines: list[bytes] = []
        self._ids = itertools.count(1000)
        self._stash: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.raw_lines.append(line)
            self.frames.put(json.loads(line))
        self.frames.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, method: str, params: dict | None = None, id: Any = "auto") -> Any:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        if id == "auto":
            id = next(self._ids)
        if id is not None:
            msg["id"] = id
        self.write(json.dumps(msg).encode() + b"\n")
        return id

    def recv(self, timeout: float = 30) -> dict | None:
        if self._stash:
            return self._stash.pop(0)
        return self.frames.get(timeout=timeout)

    def wait_response(self, id: Any, timeout: float = 30) -> tuple[dict, list[dict]]:
        """The response to `id`, and the notifications that came before it."""
        deadline = time.monotonic() + timeout
        notes: list[dict] = []
        kept: list[dict] = []
        while True:
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError("worker closed its stdout")
            if frame.get("id") == id and "method" not in frame:
                self._stash = kept + self._stash
                return frame, notes
            if frame.get("method") == "tokens":
                notes.append(frame)
            else:
                kept.append(frame)

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> Any:
        frame, _ = self.wait_response(self.send(method, params), timeout)
        if "error" in frame:
            raise AssertionError(f"{method} failed: {frame['error']}")
        return frame["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def deltas_for(notes: list[dict], request_id: Any) -> list[dict]:
    return [d for n in notes for d in n["params"]["deltas"] if d["request_id"] == request_id]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition, 0 when absent.

    Absent is 0 because that is what a counter that never moved means; a test
    asserts values, never that a family is listed (every registered family is).
    """
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class Load:
    """Background clients sending chat requests back to back, until stopped
    or `seconds` have passed (every loop here is bounded)."""

    def __init__(
        self, url: str, model: str, *, clients: int = 2, seconds: float = 60, headers=None
    ):
        import httpx

        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._http = httpx.Client(base_url=url, timeout=30, headers=headers or {})
        self._model = model
        self.sent = 0
        self.failed = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        body = {
            "model": self._model,
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 64,
            "ignore_eos": True,
            "stream": True,
        }
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
                    for _ in r.iter_lines():
                        pass
                    self.sent += 1
                    if r.status_code != 200:
                        self.failed += 1
                        time.sleep(0.05)  # a refusal comes back at once: no busy loop
            except Exception:
                self.failed += 1
                time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._http.close()

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
