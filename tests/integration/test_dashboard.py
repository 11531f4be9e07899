"""The web dashboard in a real headless browser (Debian's chromium, driven by playwright),
against a real mesh started with ``statefun-mesh run`` and loaded by the fraud example.

The numbers on the page must match ``statefun-mesh status --json`` (a counter read between
two page reads lies between them; once the load is over they are equal) and must move
under load. With STATEFUN_MESH_UPDATE_SCREENSHOT=1 it also replaces docs/dashboard.png,
the screenshot docs/operations.md shows (otherwise the screenshot stays in the test's
temporary directory, so a test run leaves the working tree clean).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.support import ROOT, Cluster, run_cli, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]

CHROMIUM = os.environ.get("STATEFUN_MESH_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest.fixture
def browser() -> Iterator[Any]:
    required = bool(os.environ.get("STATEFUN_MESH_REQUIRE_BROWSER"))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        if required:
            raise AssertionError(f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)")
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def status_json(endpoint: str) -> dict[str, Any]:
    r = run_cli("status", "--json", "--endpoint", endpoint, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def page_numbers(page: Any) -> dict[str, Any]:
    """What the page shows: per peer and per function type, from the tables' cells."""
    return page.evaluate("""() => {
        const n = s => s === "" || s == null ? null : Number(s);
        const cell = (tr, f) => tr.querySelector(`[data-field="${f}"]`);
        const peers = {}, functions = {};
        for (const tr of document.querySelectorAll("#peers tbody tr[data-peer]")) {
            const inv = cell(tr, "invocations");
            peers[tr.dataset.peer] = {
                state: cell(tr, "state") ? cell(tr, "state").textContent : null,
                invocations: inv ? n(inv.dataset.value) : null,
                invocations_text: inv ? inv.textContent : null,
                rate: cell(tr, "rate") ? n(cell(tr, "rate").dataset.value) : null,
                dead_letters: cell(tr, "dead_letters") ? n(cell(tr, "dead_letters").dataset.value) : null,
            };
        }
        for (const tr of document.querySelectorAll("#functions tbody tr[data-function]")) {
            functions[tr.dataset.function] = n(cell(tr, "invocations").dataset.value);
        }
        return {peers, functions, total: document.getElementById("kpi-invocations").textContent,
                rate: document.getElementById("kpi-rate").textContent,
                updated: document.getElementById("updated").textContent};
    }""")


def next_poll(page: Any) -> None:
    """Wait until the page has drawn a sample newer than now (it polls every second)."""
    before = page.evaluate("() => document.getElementById('updated').textContent")
    page.wait_for_function("t => document.getElementById('updated').textContent !== t", arg=before, timeout=10_000)
    page.wait_for_function(
        "t => document.getElementById('updated').textContent !== t",
        arg=page.evaluate("() => document.getElementById('updated').textContent"),
        timeout=10_000,
    )


def per_peer(doc: dict[str, Any]) -> dict[str, int]:
    return {str(s["peer"]): s["invocations"] for s in doc["status"]}


def per_function(doc: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in doc["status"]:
        for t, c in s.get("functions", {}).items():
            out[t] = out.get(t, 0) + c["invocations"]
    return out


def test_dashboard_matches_status_and_moves_under_load(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    from statefun_mesh.mesh import free_ports

    workdir = tmp_path_factory.mktemp("dashboard")
    cluster = Cluster(
        workdir,
        transport="ipc",
        peers=2,
        port=free_ports(1)[0],
        app="examples.fraud_detection:functions",
        args=("--checkpoint-interval", "1"),
    )
    load = reader = None
    try:
        cluster.wait_up()
        m = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/)", cluster.output())
        assert m, cluster.output()
        url = m.group(1)
        assert re.search(
            r"metrics at http://127\.0\.0\.1:\d+/metrics, http://127\.0\.0\.1:\d+/metrics", cluster.output()
        ), cluster.output()

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        wait_until(
            lambda: [p["state"] for p in page_numbers(page)["peers"].values()] == ["ready", "ready"],
            30,
            "both peers ready on the page",
        )
        idle = page_numbers(page)

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        load = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.fraud_detection",
                "--endpoint",
                cluster.endpoint,
                "--seconds",
                "12",
                "--rate",
                "1500",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        reader = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "statefun_mesh",
                "egress",
                "fraud/alerts",
                "--follow",
                "--endpoint",
                cluster.endpoint,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        # under load: a status read between two page reads lies between them, and they move
        next_poll(page)
        first = page_numbers(page)
        mid = status_json(cluster.endpoint)
        next_poll(page)
        second = page_numbers(page)
        for peer in ("0", "1"):
            lo, st, hi = first["peers"][peer]["invocations"], per_peer(mid)[peer], second["peers"][peer]["invocations"]
            assert lo <= st <= hi, (peer, lo, st, hi)
            assert hi > idle["peers"][peer]["invocations"], "the page did not move under load"
            # the visible text is the same number
            assert int(second["peers"][peer]["invocations_text"].replace(",", "")) == hi
        for t, n in per_function(mid).items():
            assert first["functions"].get(t, 0) <= n <= second["functions"][t], t
        wait_until(
            lambda: any((p["rate"] or 0) > 0 for p in page_numbers(page)["peers"].values()),
            10,
            "a throughput above 0 on the page under load",
        )
        time.sleep(3)  # a few seconds of history in the chart
        wait_until(
            lambda: page.locator("#readers tbody tr td[data-field=lag]").count() > 0,
            10,
            "the egress reader on the page",
        )
        next_poll(page)
        shot = workdir / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("STATEFUN_MESH_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, SCREENSHOT)

        _, err = load.communicate(timeout=60)
        assert load.returncode == 0, err

        # quiet: page and status agree exactly (the example's timers may still fire: retry)
        def agree() -> bool:
            before = status_json(cluster.endpoint)
            next_poll(page)
            shown = page_numbers(page)
            after = status_json(cluster.endpoint)
            pages = {p: v["invocations"] for p, v in shown["peers"].items()}
            return per_peer(before) == pages == per_peer(after) and per_function(before) == shown["functions"]

        wait_until(agree, 40, "the page to equal status --json once the load is over")
        total = sum(per_peer(status_json(cluster.endpoint)).values())
        assert total > 10_000  # 12 s at 1,500/s, each transaction several invocations
        assert int(page_numbers(page)["total"].replace(",", "")) == total
        assert not errors, errors
    finally:
        for proc in (load, reader):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        cluster.stop()
