"""examples/fraud_detection.py: each rule raises its alert, windows close by timer, the load generator runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from examples import fraud_detection as fd
from statefun_mesh import LocalMesh, message_builder

ROOT = Path(__file__).resolve().parents[2]


def txn(account: str, merchant: str, amount: int, n: int) -> Any:
    return message_builder(
        target_typename="fraud/account",
        target_id=account,
        value={"txn": f"t{n}", "merchant": merchant, "amount": amount},
        value_type=fd.TRANSACTION,
    )


def report(typename: str, id: str) -> Any:
    return message_builder(target_typename=typename, target_id=id, value={}, value_type=fd.REPORT)


async def alerts_of(mesh: LocalMesh, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if n == 0:
        return out
    async for rec in mesh.egress(fd.ALERTS):
        out.append(rec.as_type(fd.ALERT))
        if len(out) == n:
            break
    return out


@pytest.mark.timeout(60)
async def test_rules_raise_alerts_and_window_closes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fd, "WINDOW", timedelta(seconds=0.5))
    async with LocalMesh(fd.functions, state_dir=str(tmp_path), peers=2) as mesh:
        # velocity: the 6th transaction inside one window alerts, the first five do not
        for i in range(6):
            await mesh.send(txn("fast", "shop-a", 1000, i))
        await mesh.idle()
        (alert,) = await alerts_of(mesh, 1)
        assert alert["account"] == "fast" and alert["txn"] == "t5"
        assert alert["reasons"] == ["6 transactions within 0.5 s"]
        # the window closes by its delayed message: the next transaction starts a new count
        await asyncio.sleep(1.0)
        await mesh.idle()
        await mesh.send(txn("fast", "shop-a", 1000, 6))
        await mesh.idle()
        profile = (await mesh.request(report("fraud/account", "fast"))).as_type(fd.PROFILE)
        assert profile == {"count": 7, "total": 7000, "alerts": 1}

        # amount: far above this account's average, after MIN_HISTORY transactions
        for i in range(fd.MIN_HISTORY):
            await mesh.send(txn("big", f"shop-{i}", 1000, 100 + i))
            await asyncio.sleep(0.02)
        await mesh.idle()
        await mesh.send(txn("big", "shop-x", 50_000, 200))
        await mesh.idle()
        # merchant risk: chargebacks above the threshold make every later transaction there suspicious
        await mesh.send(txn("calm", "shop-bad", 500, 300))  # no chargebacks yet: fine
        await mesh.idle()
        await mesh.send(
            message_builder(target_typename="fraud/merchant", target_id="shop-bad", value={}, value_type=fd.CHARGEBACK)
        )
        await mesh.idle()
        await mesh.send(txn("calm", "shop-bad", 500, 301))  # 1 chargeback in 2 transactions
        await mesh.idle()
        later = await alerts_of(mesh, 3)
        by_account = {a["account"]: a for a in later}
        assert "amount far above the account's average" in by_account["big"]["reasons"]
        assert by_account["calm"]["txn"] == "t301"
        assert by_account["calm"]["reasons"] == ["merchant shop-bad has 50% chargebacks"]
        stats = (await mesh.request(report("fraud/merchant", "shop-bad"))).as_type(fd.MERCHANT_STATS)
        assert stats == {"txns": 2, "volume": 1000, "chargebacks": 1}
        profile = (await mesh.request(report("fraud/account", "calm"))).as_type(fd.PROFILE)
        assert profile == {"count": 2, "total": 1000, "alerts": 1}


async def test_load_generator_paces_and_counts(tmp_path: Path) -> None:
    async with LocalMesh(fd.functions, state_dir=str(tmp_path)) as mesh:
        sent = await fd.generate(mesh.send, seconds=0.5, rate=1000, accounts=50, merchants=10)
        await mesh.idle()
        assert 300 <= sent <= 1200
        total = 0
        for i in range(50):
            total += (await mesh.request(report("fraud/account", f"acct-{i}"))).as_type(fd.PROFILE)["count"]
        chargebacks = 0
        for i in range(0, 10, 10):
            chargebacks += (await mesh.request(report("fraud/merchant", f"shop-{i}"))).as_type(fd.MERCHANT_STATS)[
                "chargebacks"
            ]
        assert total + chargebacks == sent  # every transaction scored once, every chargeback counted once


@pytest.mark.integration  # a process
def test_demo_prints_alerts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.fraud_detection", "--seconds", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "first alerts:" in out and "reasons" in out and "acct-0:" in out
