"""The Grafana dashboard and the alert rules in deploy/, against real tools.

Every query of every dashboard panel runs against a real Prometheus
(Debian's `prometheus`) that scrapes a live gateway which served traffic,
refused some, lost a client mid-stream and had a worker killed; each must
return a number. The alert rules pass `promtool check rules` and the unit
cases in tests/alerts_test.yml. Skipped where the tools are missing (CI
installs them; see .ci/run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import MODEL_NAME, ROOT, Gateway, free_port
from .helpers import Load, wait_until

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-alerts.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
# What Grafana puts in place of the dashboard's variables: every gateway and
# model, and a rate window several scrapes long (the test scrapes every second).
VARIABLES = {"$__rate_interval": "20s", "$instance": ".*", "$model": ".*"}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows hold theirs
    return [p for p in found if p["type"] != "row"]


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title and legend, PromQL with the variables filled in) of every target."""
    found = []
    for panel in panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((f"{panel['title']} / {target['legendFormat']}", expr))
    return found


def test_dashboard_imports_with_a_prometheus_picked_at_import():
    board = dashboard()
    (source,) = board["__inputs"]
    assert source["pluginId"] == "prometheus" and source["type"] == "datasource"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert "$" not in target["expr"].replace("$__rate_interval", "").replace(
                "$instance", ""
            ).replace("$model", ""), target["expr"]
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["instance", "model"]
    # What the issue asks the dashboard to cover, each in some query.
    text = json.dumps([q for _, q in queries(board)])
    for metric in (
        "generation_tokens_total",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "num_requests_waiting",
        "num_requests_running",
        "worker_up",
        "worker_restarts_total",
        "worker_memory_bytes",
        "prefix_cache_hits_total",
        "requests_total",
    ):
        assert f"mlx_gateway_{metric}" in text, metric


@needs_promtool
def test_alert_rules_pass_promtool():
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(ROOT / "tests" / "alerts_test.yml")],
        ["check", "config", str(DEPLOY / "prometheus.yml")],
    ):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


# --- a real Prometheus scraping a real gateway ------------------------------------------


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory) -> Iterator[Gateway]:
    # One request per worker at a time and a short queue: under four clients
    # requests wait, and some are turned away.
    gateway = Gateway(
        tiny_model,
        "--workers",
        "2",
        "--max-batch-size",
        "1",
        "--max-queue",
        "2",
        log=tmp_path_factory.mktemp("observability") / "gateway.log",
    )
    gateway.wait_ready()
    yield gateway
    gateway.stop_and_check()


@pytest.fixture(scope="module")
def prometheus(gw, tmp_path_factory) -> Iterator[httpx.Client]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "mlx-gateway",
                        "static_configs": [{"targets": [f"127.0.0.1:{gw.port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = open(folder / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def ready() -> bool:
        assert proc.poll() is None, (folder / "prometheus.log").read_text()
        try:
            return client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 60, "prometheus to start", interval=0.2)
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def values(client: httpx.Client, expr: str) -> list[float]:
    body = client.get("/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success", (expr, body)
    return [float(r["value"][1]) for r in body["data"]["result"]]


def test_every_dashboard_query_returns_data(gw, prometheus):
    # Traffic of every kind a panel shows: generations that queue and are
    # refused (4 clients, 2 slots, a queue of 2), an unknown model (404), a
    # client that leaves mid-stream, and a worker killed and restarted.
    assert gw.client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code
    with Load(gw.url, MODEL_NAME, clients=4, seconds=120) as load:
        wait_until(lambda: load.sent >= 8, 60, "some requests served")
        body = {"model": MODEL_NAME, "prompt": "leave early", "max_tokens": 500, "stream": True}
        body["ignore_eos"] = True
        with gw.client.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
        victim = gw.health()["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(
            lambda: gw.health()["workers"][0]["restarts"] == 1, 60, "the killed worker's restart"
        )
        missing = dict(queries(dashboard()))
        if not sys.platform.startswith("linux"):
            # prometheus_client's process_* figures come from /proc.
            missing = {k: v for k, v in missing.items() if "process_" not in v}
        deadline = time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            for name, expr in list(missing.items()):
                if any(math.isfinite(v) for v in values(prometheus, expr)):
                    del missing[name]
            time.sleep(1)
    assert not missing, f"panels without data: {sorted(missing)}"
    assert load.sent > 0


def test_dashboard_variables_list_the_gateway_and_its_model(gw, prometheus):
    def label(name: str) -> list[str]:
        r = prometheus.get(
            f"/api/v1/label/{name}/values", params={"match[]": "mlx_gateway_worker_up"}
        )
        return r.json()["data"]

    wait_until(lambda: label("model"), 30, "a scraped model label")
    assert label("model") == [MODEL_NAME]
    assert label("instance") == [f"127.0.0.1:{gw.port}"]


def test_alert_rules_load_into_prometheus_and_evaluate(prometheus):
    def groups() -> list[dict]:
        return prometheus.get("/api/v1/rules").json()["data"]["groups"]

    wait_until(lambda: groups() and groups()[0]["rules"][0].get("lastEvaluation"), 30, "rules")
    wait_until(lambda: all(r["health"] == "ok" for r in groups()[0]["rules"]), 30, "healthy rules")
    rules = groups()[0]["rules"]
    assert len(rules) == 6
    # A healthy gateway pages nobody.
    assert not [r["name"] for r in rules if r["state"] == "firing"]
