"""Workers over ssh: a real OpenSSH server on 127.0.0.1, the system `ssh`
client, one local and one "remote" worker behind one gateway.

The remote worker runs under sshd (a session of its own), so these tests can
tell the two sides apart: the gateway's child is the ssh client, the worker
is sshd's grandchild.
"""

from __future__ import annotations

import concurrent.futures
import signal
import sys
from collections.abc import Iterator

import psutil
import pytest

from .conftest import MODEL_NAME, Gateway, free_port
from .helpers import wait_until
from .sshd import SshServer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs OpenSSH and POSIX signals")

LONG = {"model": MODEL_NAME, "prompt": "count with me", "max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[SshServer]:
    server = SshServer(tmp_path_factory.mktemp("sshd"), free_port())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mixed(tiny_model, sshd, tmp_path_factory) -> Iterator[Gateway]:
    """One local and one ssh worker for the tiny model."""
    gw = Gateway(
        tiny_model,
        "--worker-host", "local",
        "--worker-host", sshd.dest,
        "--ssh-command", sshd.command,
        "--heartbeat-interval", "1",
        log=tmp_path_factory.mktemp("mixed") / "gateway.log",
    )  # fmt: skip
    gw.wait_ready(90)
    both_ready(gw)
    yield gw
    kids = gw.children()
    gw.stop()
    _, alive = psutil.wait_procs(kids + sshd.workers(), timeout=20)
    assert not alive, f"left behind after the gateway stopped: {alive}"


def both_ready(gw: Gateway) -> list[dict]:
    def ready():
        workers = gw.health()["workers"]
        return workers if all(w["state"] == "ready" for w in workers) else None

    return wait_until(ready, 90, "both workers to be ready", interval=0.2)


def remote(gw: Gateway) -> dict:
    return next(w for w in gw.health()["workers"] if w["host"] != "local")


def test_health_and_metrics_name_each_workers_host(mixed, sshd):
    hosts = {w["id"]: w["host"] for w in both_ready(mixed)}
    assert hosts == {f"{MODEL_NAME}/0": "local", f"{MODEL_NAME}/1": sshd.dest}
    metrics = mixed.metrics()
    assert f'mlx_gateway_worker_info{{host="{sshd.dest}",model="{MODEL_NAME}",ranks="1"' in metrics
    assert 'mlx_gateway_worker_info{host="local"' in metrics
    # The remote worker really runs under sshd, and only one does.
    assert len(sshd.workers()) == 1


def test_requests_are_served_by_both_workers(mixed):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = [
            pool.submit(mixed.client.post, "/v1/completions", json=LONG, timeout=180)
            for _ in range(2)
        ]
        busy = wait_until(
            lambda: all(w["in_flight"] == 1 for w in mixed.health()["workers"]),
            60,
            "one request on each worker",
        )
        assert busy
        for reply in replies:
            r = reply.result(timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]


def test_killing_the_remote_worker_retries_its_request_and_restarts_it(mixed, sshd):
    before = remote(mixed)
    (old_worker,) = sshd.workers()
    ssh_client = psutil.Process(before["pid"])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = [
            pool.submit(mixed.client.post, "/v1/completions", json=LONG, timeout=180)
            for _ in range(2)
        ]
        wait_until(
            lambda: all(w["in_flight"] == 1 for w in mixed.health()["workers"]),
            60,
            "one request on each worker",
        )
        old_worker.send_signal(signal.SIGKILL)
        # Nothing of the non-streamed reply had reached its client: it is
        # sent again, to the local worker, and completes.
        for reply in replies:
            r = reply.result(timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    psutil.wait_procs([ssh_client], timeout=20)
    assert not ssh_client.is_running(), "the ssh client outlived its remote worker"
    after = wait_until(
        lambda: (w := remote(mixed))["state"] == "ready" and w["restarts"] == 1 and w,
        60,
        "the remote worker to restart",
    )
    assert after["pid"] != before["pid"]
    (new_worker,) = sshd.workers()
    assert new_worker.pid != old_worker.pid


def test_killing_the_ssh_client_ends_the_remote_worker_and_restarts_it(mixed, sshd):
    before = remote(mixed)
    (old_worker,) = sshd.workers()
    psutil.Process(before["pid"]).send_signal(signal.SIGKILL)
    # The link's end is the worker's stdin closing: it exits by itself.
    _, alive = psutil.wait_procs([old_worker], timeout=30)
    assert not alive, "the remote worker outlived its ssh client"
    after = wait_until(
        lambda: (
            (w := remote(mixed))["state"] == "ready"
            and w["restarts"] == before["restarts"] + 1
            and w
        ),
        60,
        "the remote worker to restart",
    )
    assert after["pid"] != before["pid"]
    assert len(sshd.workers()) == 1
    r = mixed.client.post("/v1/completions", json={**LONG, "max_tokens": 5})
    assert r.status_code == 200


def test_an_unreachable_host_is_a_clear_state_not_a_crash_loop(start_gateway, sshd):
    closed = free_port()  # nothing listens here
    gw = start_gateway(
        "--worker-host", "local",
        "--worker-host", sshd.dest,
        "--ssh-command", sshd.command.replace(f"-p {sshd.port}", f"-p {closed}"),
    )  # fmt: skip

    def tries() -> float:
        for line in gw.metrics().splitlines():
            if line.startswith("mlx_gateway_worker_restarts_total") and "unreachable" in line:
                return float(line.split()[-1])
        return 0.0

    wait_until(lambda: tries() >= 2, 60, "two tries to reach the host", interval=0.2)
    worker = remote(gw)
    assert worker["state"] == "unreachable" and worker["restarts"] == 0, worker
    assert "unreachable" in worker["failure"] and "Connection refused" in worker["failure"]
    health = gw.client.get("/health")
    assert health.status_code == 200, "the local worker still serves the model"
    assert health.json()["models"][MODEL_NAME]["state"] == "ready"
    metrics = gw.metrics()
    # Said once, not once per retry; and the circuit stays closed.
    assert gw.log().count("unreachable: ") == 1, gw.log()
    assert 'mlx_gateway_model_circuit_state{model="tiny"} 0.0' in metrics
    r = gw.client.post("/v1/completions", json={**LONG, "max_tokens": 5})
    assert r.status_code == 200


def ranks(sshd: SshServer) -> list[psutil.Process]:
    """Ranks of a sharded worker under sshd (not the module gateway's worker)."""
    return sshd.workers(ranks=True)


def test_a_sharded_worker_with_a_rank_over_ssh(start_gateway, sshd):
    gw = start_gateway(
        "--shard", "2",
        "--shard-hosts", f"local,{sshd.dest}=127.0.0.1",
        "--shard-port", str(free_port()),
        "--ssh-command", sshd.command,
    )  # fmt: skip
    (worker,) = gw.health()["workers"]
    assert [r["host"] for r in worker["ranks"]] == ["local", sshd.dest]
    (remote_rank,) = ranks(sshd)
    r = gw.client.post("/v1/completions", json={**LONG, "max_tokens": 8}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    local_rank = psutil.Process(worker["pids"][0])
    remote_rank.send_signal(signal.SIGKILL)
    # The whole group goes (rank 0 here too) and comes back.
    _, alive = psutil.wait_procs([local_rank], timeout=30)
    assert not alive, "rank 0 outlived its group"
    wait_until(
        lambda: (w := gw.health()["workers"][0])["state"] == "ready" and w["restarts"] == 1,
        90,
        "the group to restart",
    )
    assert len(ranks(sshd)) == 1
    gw.stop()
    _, alive = psutil.wait_procs(ranks(sshd), timeout=30)
    assert not alive, f"a remote rank outlived the gateway: {alive}"


def test_a_sigkilled_gateway_leaves_no_worker_on_either_side(mixed, sshd):
    # Last in this module: it ends the shared gateway.
    both_ready(mixed)
    local = mixed.children()
    remote_workers = sshd.workers()
    assert local and len(remote_workers) == 1
    mixed.proc.kill()
    # The ssh client's stdin closes with the gateway; ssh passes the end on,
    # and the remote worker exits, as the local one does.
    _, alive = psutil.wait_procs(local + remote_workers, timeout=30)
    assert not alive, f"outlived a SIGKILLed gateway: {alive}"
