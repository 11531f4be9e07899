"""``bench/mesh_perf.py`` at a small size still runs, measures both baselines and prints issue 9's targets.

Not a performance test: the figures are not checked against the targets, only for being there
(so the benchmark cannot rot) and for what holds at any speed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.support import ROOT, run_bench_script

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]


def test_mesh_perf_small_run_prints_both_baselines_and_issue_9s_targets(tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    env = dict(os.environ)
    env.pop("STATEFUN_MESH_ENDPOINT", None)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "mesh_perf.py"),
        "--peers",
        "1",
        "--core",
        "c",
        "--transport",
        "tcp",
        "--checkpoint-interval",
        "1",
        "--phases",
        "counter",
        "latency",
        "--messages",
        "40000",  # ~0.15 s of a peer's CPU: /proc counts it in 10 ms ticks, and 4,000 took under one
        "--keys",
        "200",
        "--repeat",
        "1",
        "--requests",
        "50",
        "--chain-requests",
        "0",
        "--chains",
        "50",
        "-q",
        "--json",
        str(out_json),
    ]
    text, _ = run_bench_script(cmd, env, 120)
    assert "x base: StateFun-shaped dispatch, no I/O" in text and "beside: msgpack unpack + trivial dispatch" in text
    assert ">= 250,000 counter invocations/s per peer, 1 peer(s):" in text
    assert ">= 0.40 of the StateFun-shaped no-I/O dispatch (cpu), 1 peer(s):" in text
    assert "request->reply p99 < 1 ms to the owner peer, 1 peer(s):" in text
    (r,) = json.loads(out_json.read_text())["results"]
    shaped, trivial = r["baseline"], r["baseline_trivial"]
    assert shaped["what"].startswith("StateFun-shaped") and trivial["what"].startswith("msgpack")
    # the shaped dispatch does per message what the trivial one does and much more
    assert shaped["median_per_cpu_s"] < trivial["median_per_cpu_s"]
    c = r["counter"]
    assert c["median_run"]["ratio_cpu"] == pytest.approx(
        c["median_run"]["rate_per_cpu_s"] / c["median_run"]["baseline_per_cpu_s"]
    )
    assert c["median_run"]["baseline_per_cpu_s"] < c["median_run"]["baseline_trivial_per_cpu_s"]
