"""Shared fixtures: the tiny demo model, real workers and a real gateway.

Nothing here is mocked: the gateway is `python -m gateway serve` in its own
process, listening on a free port, running real `python -m worker` processes
that load the tiny demo model with mlx-lm.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from worker import demo

from .helpers import WorkerPipe, wait_until

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny"


def pytest_addoption(parser):
    parser.addoption(
        "--long", action="store_true", help="run the chaos/soak suites at long settings"
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return demo.build(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def reasoning_model(tmp_path_factory) -> Path:
    return demo.build(tmp_path_factory.mktemp("models") / "think", preset="tiny-reasoning", seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A `python -m gateway serve` process and what a test needs of it."""

    def __init__(
        self,
        model: Path | None,
        *args: str,
        env: dict | None = None,
        log: Path,
        name: str = MODEL_NAME,
        prefix: tuple[str, ...] = (),
        preexec_fn=None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115
        cmd = [
            *prefix,  # e.g. a command that lowers the process's limits
            sys.executable,
            "-m",
            "gateway",
            "serve",
            *(["--model", f"{name}={model}"] if model is not None else []),
            "--port",
            str(self.port),
            "--log-level",
            "info",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout: float = 60) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = self.client.get("/health")
            except httpx.TransportError:
                return None
            return r.json() if r.status_code == 200 else None

        return wait_until(ready, timeout, "gateway to become ready")

    def wait_listening(self, timeout: float = 30) -> None:
        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.client.get("/health").status_code in (200, 503)
            except httpx.TransportError:
                return False

        wait_until(listening, timeout, "gateway to listen")

    def health(self) -> dict:
        return self.client.get("/health").json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["workers"] if w["pid"]]

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop_and_check(self) -> None:
        """Stop the gateway; no worker may outlive it."""
        kids = self.children()
        self.stop()
        _, alive = psutil.wait_procs(kids, timeout=15)
        for p in alive:
            p.kill()
        assert not alive, f"workers outlived the gateway: {alive}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.client.close()
        self._log.close()


@pytest.fixture
def start_gateway(tiny_model, tmp_path) -> Iterator:
    """Start gateways with given flags; each is stopped (and checked) at the end."""
    started: list[Gateway] = []

    def start(*args: str, env: dict | None = None, ready: bool = True, **kw) -> Gateway:
        gw = Gateway(tiny_model, *args, env=env, log=tmp_path / f"gateway-{len(started)}.log", **kw)
        started.append(gw)
        if ready:
            gw.wait_ready()
        else:
            gw.wait_listening()
        return gw

    yield start
    for gw in started:
        kids = gw.children()
        gw.stop()
        # No worker may outlive its gateway.
        _, alive = psutil.wait_procs(kids, timeout=15)
        for p in alive:
            p.kill()
        assert not alive, f"workers outlived the gateway: {alive}"


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory) -> Iterator[Gateway]:
    """One shared gateway with two workers, for tests that do not break it."""
    gw = Gateway(
        tiny_model,
        "--workers",
        "2",
        log=tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop_and_check()


@pytest.fixture
def raw_worker() -> Iterator[WorkerPipe]:
    """A `python -m worker` process with no model loaded."""
    pipe = WorkerPipe()
    yield pipe
    pipe.close()


__all__ = ["MODEL_NAME", "Gateway", "time"]
