"""Run the whole suite on both cores, in two lanes side by side: what `make test` and CI run.

The suite is the same as ``STATEFUN_MESH_REQUIRE_EXTENSIONS=1 pytest && STATEFUN_MESH_NO_EXTENSIONS=1 pytest``
(every test of the C pass, every test of the pure-Python pass), split in two lanes that run at once:

- lane 1: the C core's pass over tests/integration, but for the files in ``LANE_2_C_FILES``;
- lane 2: the C core's pass over tests/unit and ``LANE_2_C_FILES``, then the pure-Python pass over everything.

Why: the suite mostly waits (a peer process's start, a checkpoint, a recovery round, a window in
which something must not happen): one pass keeps about a third of one core busy on a 2-core
machine, so two lanes take about as long as the longer one, not as both. ``LANE_2_C_FILES`` balances
the lanes (measured: see docs/testing.md); a new integration file lands in lane 1 by itself, so no
test is left out. Each lane has pytest's own temp directory, ports are picked at random and
network namespaces carry the test process's pid, so the lanes do not meet.

Lane 1's output is shown as it runs; lane 2's passes are shown once lane 1 is done (each pass whole,
not interleaved). The last line adds up all three passes. The exit status is 0 only if every pass
passed. Arguments are handed to every pytest (e.g. ``-x``, ``-p no:randomly``).

Usage: ``python3 tests/run_passes.py [pytest options]`` from the repository root.
"""

from __future__ import annotations

import codecs
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import TextIO, cast

ROOT = Path(__file__).resolve().parents[1]
#: integration files the C core runs in lane 2, beside tests/unit and the pure pass, to balance the lanes
LANE_2_C_FILES = ("tests/integration/test_hosts.py",)
C_CORE = {"STATEFUN_MESH_REQUIRE_EXTENSIONS": "1"}
PURE = {"STATEFUN_MESH_NO_EXTENSIONS": "1"}
_CORE_VARS = ("STATEFUN_MESH_REQUIRE_EXTENSIONS", "STATEFUN_MESH_NO_EXTENSIONS")
#: pytest's closing line, e.g. "==== 1980 passed, 18 skipped, 2 xfailed in 973.81s (0:16:13) ====" (no "=" with -q)
_SUMMARY = re.compile(r"^(?:=+ )?(\d+ [a-z]+(?:, \d+ [a-z]+)*) in [\d.]+s(?: \([\d:]+\))?(?: =+)?$")


@dataclass
class Pass:
    name: str
    core: dict[str, str]
    args: list[str]
    lines: list[str] = field(default_factory=list)
    returncode: int | None = None
    seconds: float = 0.0
    proc: subprocess.Popen[bytes] | None = None

    def command(self, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "pytest", *self.args, *extra]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CORE_VARS}
        env.update(self.core)
        return env

    def counts(self) -> dict[str, int]:
        """pytest's closing counts ("passed", "failed", "skipped", "error", ...); empty if it printed none."""
        for line in reversed(self.lines):
            m = _SUMMARY.match(line.strip())
            if m:
                counts: dict[str, int] = {}
                for part in m.group(1).split(", "):
                    n, _, what = part.partition(" ")
                    if n.isdigit():
                        counts[what.rstrip("s") if what in ("errors", "warnings") else what] = int(n)
                return counts
        return {}

    def run(self, extra: list[str], out: TextIO | None) -> None:
        """Run the pass; each line goes to ``out`` as it comes (None: only kept, shown later)."""
        started = time.monotonic()
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
            self.proc = proc = subprocess.Popen(
                self.command(extra),
                cwd=ROOT,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if out is not None else log,
                stderr=subprocess.STDOUT,
            )
            if out is not None:
                assert proc.stdout is not None
                seen: list[str] = []
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                # as it comes, not line by line: pytest's progress dots show before a line is full
                while raw := cast(BufferedReader, proc.stdout).read1(65536):
                    chunk = decoder.decode(raw)
                    out.write(chunk)
                    out.flush()
                    seen.append(chunk)
                self.lines = "".join(seen).splitlines()
            self.returncode = proc.wait()
            if out is None:
                log.seek(0)
                self.lines = log.read().splitlines()
        self.seconds = time.monotonic() - started


def lanes() -> tuple[list[Pass], list[Pass]]:
    ignore = [f"--ignore={f}" for f in LANE_2_C_FILES]
    lane1 = [Pass("C core: tests/integration (but lane 2's files)", C_CORE, ["tests/integration", *ignore])]
    lane2 = [
        Pass(f"C core: tests/unit, {', '.join(LANE_2_C_FILES)}", C_CORE, ["tests/unit", *LANE_2_C_FILES]),
        Pass("pure-Python twin: every test marked for it", PURE, []),
    ]
    return lane1, lane2


def main(extra: list[str]) -> int:
    lane1, lane2 = lanes()

    stopping = threading.Event()

    def run_lane2() -> None:
        for p in lane2:
            if not stopping.is_set():
                p.run(extra, None)

    started = time.monotonic()
    second = threading.Thread(target=run_lane2, name="lane 2")
    second.start()
    print(f"lane 1 (shown as it runs): {lane1[0].name}", flush=True)
    print(f"lane 2 (shown when lane 1 is done): {'; then '.join(p.name for p in lane2)}", flush=True)
    try:
        for p in lane1:
            p.run(extra, sys.stdout)
        second.join()
    finally:  # interrupted (Ctrl-C, an error here): stop lane 2's pytest too, not leave it running
        stopping.set()
        for p in lane2:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
    for p in lane2:
        print(f"\n===== lane 2: {p.name} (python3 {shlex.join(p.command(extra)[1:])}) =====", flush=True)
        print("\n".join(p.lines), flush=True)
    total: dict[str, int] = {}
    print(f"\n===== both lanes took {time.monotonic() - started:.0f} s =====")
    for p in [*lane1, *lane2]:
        counts = p.counts()
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        shown = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no closing line"
        print(f"{p.name}: exit {p.returncode}, {shown}, {p.seconds:.0f} s")
    worst = max((p.returncode or 0 for p in [*lane1, *lane2]), key=abs)
    failed = total.get("failed", 0) + total.get("error", 0)
    passed, skipped = total.get("passed", 0), total.get("skipped", 0)
    print(f"total: {passed} passed, {failed} failed, {skipped} skipped", flush=True)  # all three passes
    return worst if worst else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
