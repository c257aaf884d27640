"""deploy/cluster: several gateways behind nginx (or HAProxy).

The configurations are checked by the balancers themselves (`nginx -t`,
`haproxy -c`), and the nginx one is run for real in front of two real
gateways: a conversation sticks to one gateway, streams pass through
unbuffered, and losing a gateway moves its conversations to the other.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import MODEL_NAME, ROOT, Gateway, free_port
from .helpers import wait_until

CLUSTER = ROOT / "deploy" / "cluster"
BODY = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "ignore_eos": True}


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def test_nginx_accepts_the_example():
    nginx = _binary("nginx")
    done = subprocess.run(
        [nginx, "-t", "-c", str(CLUSTER / "nginx.conf")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_haproxy_accepts_the_example():
    haproxy = _binary("haproxy")
    done = subprocess.run(
        [haproxy, "-c", "-f", str(CLUSTER / "haproxy.cfg")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_describes_the_example():
    readme = (ROOT / "README.md").read_text()
    nginx = (CLUSTER / "nginx.conf").read_text()
    for needle in ("deploy/cluster/nginx.conf", "deploy/cluster/haproxy.cfg", "X-Conversation-Id"):
        assert needle in readme
    assert "X-Conversation-Id".lower() in nginx.lower().replace("_", "-")
    assert "hash $conversation consistent" in nginx and "proxy_buffering off" in nginx


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory) -> Iterator[tuple[str, dict[str, Gateway]]]:
    nginx = _binary("nginx")
    root = tmp_path_factory.mktemp("cluster")
    gateways = [Gateway(tiny_model, log=root / f"gateway-{i}.log") for i in range(2)]
    proc = None
    try:
        for gw in gateways:
            gw.wait_ready(90)
        port = free_port()
        conf = (CLUSTER / "nginx.conf").read_text()
        conf = conf.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        conf = conf.replace("127.0.0.1:8001", f"127.0.0.1:{gateways[0].port}")
        conf = conf.replace("127.0.0.1:8002", f"127.0.0.1:{gateways[1].port}")
        conf = conf.replace("/tmp/mlx-gateway-nginx.pid", str(root / "nginx.pid"))
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            conf = conf.replace("http {", f"http {{\n    {temp}_temp_path {root / temp};", 1)
        (root / "nginx.conf").write_text(conf)
        proc = subprocess.Popen(
            [nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
            stderr=open(root / "nginx.log", "wb"),  # noqa: SIM115
        )
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                pytest.fail((root / "nginx.log").read_text())
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 30, "nginx to listen")
        yield url, {f"127.0.0.1:{gw.port}": gw for gw in gateways}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        for gw in gateways:
            kids = gw.children()
            gw.stop()
            psutil.wait_procs(kids, timeout=15)


def ask(url: str, conversation: str) -> str:
    r = httpx.post(
        url + "/v1/completions",
        json=BODY,
        headers={"X-Conversation-Id": conversation},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # The gateway that answered (after any that refused the connection).
    return r.headers["x-upstream"].split(", ")[-1]


def test_a_conversation_sticks_to_one_gateway_and_streams_pass_through(cluster):
    url, gateways = cluster
    homes: dict[str, str] = {}
    for i in range(40):
        homes[f"conversation-{i}"] = ask(url, f"conversation-{i}")
        if len(set(homes.values())) == 2 and len(homes) >= 4:
            break
    assert set(homes.values()) == set(gateways), "the hash spreads conversations over both"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        again = {c: pool.submit(ask, url, c) for c in homes for _ in range(2)}
        for conversation, reply in again.items():
            assert reply.result() == homes[conversation]
    # Streams come through chunk by chunk, not buffered into one.
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        # Long enough that its tokens arrive in many events even on a loaded
        # machine, where a short reply's tokens may share one.
        json={**BODY, "max_tokens": 400, "stream": True},
        headers={"X-Conversation-Id": "conversation-0"},
        timeout=60,
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 3 and events[-1] == "data: [DONE]"


def test_losing_a_gateway_moves_its_conversations_to_the_other(cluster):
    url, gateways = cluster
    conversation = "conversation-lost"
    home = ask(url, conversation)
    gateways[home].stop()
    other = next(addr for addr in gateways if addr != home)
    for _ in range(3):
        assert ask(url, conversation) == other
    metrics = gateways[other].client.get("/metrics").text
    assert re.search(r'mlx_gateway_requests_total\{endpoint="[^"]*completions', metrics)
