"""The status page in a real headless Chromium, against a real 2-worker gateway.

Skipped where Chromium or Playwright is missing (CI installs Debian's
`chromium`; see .ci/run). Playwright drives the system's browser: nothing
is downloaded.

The gateway runs with `--max-restarts 0` and a long `--circuit-reset`, so a
killed worker stays `failed` for the rest of the module: the page's state
change is then there to be seen, not a race against a quick restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL_NAME, ROOT, Gateway
from .helpers import Load, wait_until

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

KEY = "status-page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BROWSER = next(
    (
        path
        for path in (
            os.environ.get("MLX_GATEWAY_CHROMIUM"),
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if path
    ),
    None,
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# Set to write the README's screenshot from the charts-under-load test.
SCREENSHOT = os.environ.get("MLX_GATEWAY_SCREENSHOT")

pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory) -> Iterator[Gateway]:
    gateway = Gateway(
        tiny_model,
        "--workers",
        "2",
        "--max-restarts",
        "0",
        "--circuit-reset",
        "600",
        "--api-key",
        KEY,
        log=tmp_path_factory.mktemp("status") / "gateway.log",
    )
    gateway.wait_ready()
    yield gateway
    gateway.stop_and_check()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=BROWSER, args=FLAGS)
        yield chromium
        chromium.close()


class Page:
    """One browser tab on the status page, with every console error kept."""

    def __init__(self, browser, url: str, key: str | None):
        self.context = browser.new_context(viewport={"width": 1200, "height": 820})
        if key is not None:
            # As if the key had been entered before: the first poll succeeds.
            self.context.add_init_script(f"sessionStorage.setItem('mlx-gateway-api-key', {key!r})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(f"{url}/status")

    def workers(self) -> dict[str, dict]:
        return self.page.eval_on_selector_all(
            "tr[data-worker]",
            """rows => Object.fromEntries(rows.map(r => [r.dataset.worker, {
                state: r.dataset.state, pid: r.dataset.pid,
                text: r.innerText}]))""",
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, gw) -> Iterator[Page]:
    tab = Page(browser, gw.url, KEY)
    yield tab
    tab.close()


def test_page_is_open_but_its_data_needs_the_key(gw):
    assert httpx.get(f"{gw.url}/status").status_code == 200
    assert httpx.get(f"{gw.url}/status/app.js").status_code == 200
    assert httpx.get(f"{gw.url}/status/data").status_code == 401
    data = httpx.get(f"{gw.url}/status/data", headers=AUTH).json()
    assert [w["id"] for w in data["models"][MODEL_NAME]["workers"]] == [
        f"{MODEL_NAME}/0",
        f"{MODEL_NAME}/1",
    ]
    # Served by the gateway itself: nothing on the page may come from elsewhere.
    page = httpx.get(f"{gw.url}/status")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    static = ROOT / "gateway" / "static"
    for name in ("status.html", "status.js", "status.css"):
        assert "http://" not in (static / name).read_text().replace("http://www.w3.org", "")
        assert "https://" not in (static / name).read_text()


def test_loads_without_console_errors_and_shows_every_worker(page, gw):
    rows = wait_until(lambda: (w := page.workers()) and len(w) == 2 and w, 30, "two worker rows")
    health = gw.client.get("/health", headers=AUTH).json()
    for worker in health["workers"]:
        shown = rows[worker["id"]]
        assert shown["state"] == "ready"
        assert shown["pid"] == str(worker["pid"])
        assert socket.gethostname() in shown["text"]  # a local worker's host, by name
    assert page.page.inner_text("#overall") == "ready"
    assert page.errors == []


def test_asks_for_the_key_and_then_shows_the_workers(browser, gw):
    tab = Page(browser, gw.url, key=None)
    try:
        tab.page.wait_for_selector("#login:not([hidden])", timeout=30_000)
        assert tab.workers() == {}
        tab.page.fill("#key", "wrong")
        tab.page.click("button[type=submit]")
        # Polled from here, not with wait_for_function: a predicate that is
        # not yet true is re-run inside the page by eval, which the page's
        # CSP (script-src 'self') refuses.
        wait_until(
            lambda: "refused" in tab.page.inner_text("#login-error"), 30, "the refusal shown"
        )
        tab.page.fill("#key", KEY)
        tab.page.click("button[type=submit]")
        wait_until(lambda: len(tab.workers()) == 2, 30, "worker rows after the key")
        # The only errors: the browser's own notes on the two 401 answers.
        assert all("401" in e for e in tab.errors), tab.errors
    finally:
        tab.close()


def test_shows_a_killed_worker_change_state(page, gw):
    wait_until(lambda: len(page.workers()) == 2, 30, "two worker rows")
    victim = gw.client.get("/health", headers=AUTH).json()["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    # With --max-restarts 0 it is failed, and the page says why.
    wait_until(lambda: page.workers()[victim["id"]]["state"] == "failed", 30, "the failed state")
    row = page.workers()[victim["id"]]
    assert "SIGKILL" in row["text"]
    other = page.workers()[f"{MODEL_NAME}/1"]
    assert other["state"] == "ready"
    assert page.errors == []


def _tokens_chart(page: Page) -> tuple[float, str]:
    last, points = page.page.eval_on_selector(
        "#chart-tokens",
        "f => [f.dataset.last, f.querySelector('polyline.series').getAttribute('points')]",
    )
    return float(last or 0), points


def test_charts_move_under_load(page, gw):
    page.page.wait_for_selector("#chart-tokens polyline.series", state="attached", timeout=30_000)
    # Idle first: the gateway has served nothing for a while.
    wait_until(lambda: _tokens_chart(page)[0] == 0, 30, "an idle tokens/s chart")
    _, idle_points = _tokens_chart(page)
    with Load(gw.url, MODEL_NAME, clients=3, seconds=90, headers=AUTH) as load:
        rate = wait_until(
            lambda: (r := _tokens_chart(page)[0]) > 0 and r, 60, "tokens/s to rise on the page"
        )
        ttft = page.page.inner_text("#chart-ttft .now")
        if SCREENSHOT:
            # A few more points, so the picture shows a curve, not a step.
            wait_until(lambda: load.sent >= 30, 60, "some traffic for the screenshot")
            page.page.wait_for_timeout(12_000)
            page.page.set_viewport_size({"width": 1200, "height": 360})  # no blank below
            page.page.screenshot(path=str(Path(SCREENSHOT)), full_page=True)
    assert rate > 0 and load.sent > 0 and load.failed == 0
    assert _tokens_chart(page)[1] != idle_points
    assert float(ttft.replace(",", "")) > 0
    assert page.errors == []
