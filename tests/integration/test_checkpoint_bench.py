"""``bench/checkpoint_perf.py --quick`` still runs and prints its figures (so the benchmark cannot rot).

Not a performance test: the sizes are small and the numbers are not checked against
targets, only for being there and for what holds at any speed (a 1%-changed delta is
about 1% of the base).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.support import ROOT, run_bench_script

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]


def test_checkpoint_perf_quick_runs_and_prints_its_figures(tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    env = dict(os.environ)
    env.pop("STATEFUN_MESH_ENDPOINT", None)
    text, _ = run_bench_script(
        [sys.executable, str(ROOT / "bench" / "checkpoint_perf.py"), "--quick", "--json", str(out_json)], env, 90
    )
    for heading in ("checkpoint duration and bytes uploaded", "counter throughput", "SIGKILL of peer 1"):
        assert heading in text, text
    assert "with / without checkpoints:" in text
    res = json.loads(out_json.read_text())["results"]
    (size,) = res["deltas"]
    one_percent = next(r for r in size["deltas"] if r["fraction"] == 0.01)
    assert 0.005 < one_percent["delta_over_base"] < 0.02  # a 1% delta uploads about 1% of the state
    assert res["throughput"]["on_rate"] > 0 and res["throughput"]["off_rate"] > 0
    assert {r["mode"] for r in res["recovery"]} == {"local", "blob"}
    assert all(k["kill_to_answer_s"] > 0 for r in res["recovery"] for k in r["kills"])
