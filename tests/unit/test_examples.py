"""The examples run and do what their docstrings say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from examples import shopping_cart
from examples.greeter import GREETINGS, compute_greeting
from examples.greeter import functions as greeter_functions
from statefun_mesh import LocalMesh, MeshConfig, message_builder

ROOT = Path(__file__).resolve().parents[2]


async def test_greeter_counts_visits_and_greets(tmp_path: Path) -> None:
    async with LocalMesh(greeter_functions, state_dir=str(tmp_path)) as mesh:
        for _ in range(3):
            await mesh.send(message_builder(target_typename="example/person", target_id="Ann", str_value="Ann"))
        reply = await mesh.request(message_builder(target_typename="example/person", target_id="Ann", str_value="Ann"))
        assert reply.as_string() == compute_greeting("Ann", 4)
        greetings = []
        async for rec in mesh.egress(GREETINGS):
            greetings.append(rec.as_string())
            if len(greetings) == 4:
                break
        assert greetings == [compute_greeting("Ann", i) for i in range(1, 5)]


@pytest.mark.integration  # a process
def test_greeter_main_prints_greetings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.greeter", "Zoe", "Zoe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Welcome Zoe" in out and "Third time is a charm Zoe" in out


async def test_shopping_cart_reserves_stock_and_checks_out(tmp_path: Path) -> None:
    sc = shopping_cart
    async with LocalMesh(sc.functions, state_dir=str(tmp_path)) as mesh:
        await mesh.send(
            message_builder(
                target_typename="example/stock", target_id="socks", value={"quantity": 3}, value_type=sc.RESTOCK
            )
        )
        first = await mesh.request(sc.cart_message("ann", {"item": "socks", "quantity": 2}, sc.ADD_TO_CART))
        assert first.as_type(sc.AVAILABILITY)["in_stock"] is True
        second = await mesh.request(sc.cart_message("bob", {"item": "socks", "quantity": 2}, sc.ADD_TO_CART))
        assert second.as_type(sc.AVAILABILITY)["in_stock"] is False  # only 1 left
        basket = await mesh.request(sc.cart_message("ann", {}, sc.VIEW))
        assert basket.as_type(sc.BASKET) == {"socks": 2}
        receipt = await mesh.request(sc.cart_message("ann", {}, sc.CHECKOUT))
        assert receipt.as_type(sc.RECEIPT) == {"user": "ann", "items": {"socks": 2}}
        assert (await mesh.request(sc.cart_message("ann", {}, sc.VIEW))).as_type(sc.BASKET) == {}
        async for rec in mesh.egress(sc.RECEIPTS):
            assert json.loads(rec.raw_value())["user"] == "ann"
            break


@pytest.mark.integration  # an HTTP server
async def test_web_service_answers_from_function_state(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    from aiohttp.test_utils import TestClient, TestServer

    from examples.web_service import make_app

    app = make_app(MeshConfig(state_dir=str(tmp_path)))
    async with TestClient(TestServer(app)) as client:
        for _ in range(2):
            resp = await client.post("/visit/Alice")
            assert resp.status == 202
        resp = await client.get("/greet/Alice")
        assert resp.status == 200
        assert (await resp.json()) == {"greeting": compute_greeting("Alice", 3)}
