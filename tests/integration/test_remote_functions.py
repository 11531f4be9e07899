"""Remote functions: the mesh calls StateFun functions behind HTTP endpoints (module.yaml).

Real HTTP on 127.0.0.1 (aiohttp servers inside the test's event loop), real LMDB, the
official SDK's own RequestReplyHandler where it is installed, and ours.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import statefun_mesh as sm

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

pytestmark = pytest.mark.integration


class Server:
    """An aiohttp server on 127.0.0.1 whose behaviour a test can change; it counts requests."""

    def __init__(self, handle: Callable[[bytes], Any]) -> None:
        self.handle = handle
        self.requests = 0
        self.batch_sizes: list[int] = []
        self.runner: Any = None
        self.port = 0

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        from statefun_mesh.remote.protocol import ToFunction

        self.batch_sizes.append(len(ToFunction.FromString(body).invocation.invocations))
        out = await self.handle(body)
        if isinstance(out, web.StreamResponse):
            return out
        return web.Response(body=out, content_type="application/octet-stream")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def aclose(self) -> None:
        await self.runner.cleanup()


def module_file(tmp_path: Path, *components: tuple[str, int, str]) -> str:
    docs = []
    for functions, port, extra in components:
        docs.append(
            "kind: io.statefun.endpoints.v2/http\n"
            "spec:\n"
            f"  functions: {functions}\n"
            f"  urlPathTemplate: http://127.0.0.1:{port}/{{function.name}}\n"
            f"{extra}"
        )
    path = tmp_path / "module.yaml"
    path.write_text("---\n".join(docs))
    return str(path)


async def egress(mesh: sm.LocalMesh, name: str) -> list[sm.EgressRecord]:
    return [r for p in mesh.peers for r in p.egress_read(name, 0, 10_000)]


async def settle(mesh: sm.LocalMesh, until: Callable[[], bool] | None = None, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await mesh.idle(timeout=timeout)
        if until is None or until() or asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.05)


# -- the functions behind the endpoints ------------------------------------------------------


def official_greeter() -> Any:
    """A greeter written with the official SDK, unchanged: state, a local call, delayed + cancel, egress."""
    statefun = pytest.importorskip("statefun", reason="the official SDK (apache-flink-statefun, in the dev extra)")
    functions = statefun.StatefulFunctions()

    @functions.bind(
        typename="remote.example/greeter",
        specs=[
            statefun.ValueSpec(name="seen", type=statefun.IntType),
            statefun.ValueSpec(
                name="names", type=statefun.make_json_type("example/names"), expire_after_call=timedelta(days=1)
            ),
        ],
    )
    async def greeter(context: Any, message: Any) -> None:
        if message.is_string():
            name = message.as_string()
            seen = (context.storage.seen or 0) + 1
            context.storage.seen = seen
            context.storage.names = [*(context.storage.names or []), name]
            context.send(statefun.message_builder(target_typename="local/counter", target_id="all", int_value=1))
            context.send_after(
                timedelta(milliseconds=50),
                statefun.message_builder(
                    target_typename="remote.example/greeter", target_id=context.address.id, int_value=seen
                ),
                cancellation_token=f"t{seen}",
            )
            if seen == 2:
                context.cancel_delayed_message("t2")
            context.send_egress(
                statefun.kafka_egress_message(
                    typename="e/kafka", topic="greetings", key=name, value=f"hello {name} #{seen}"
                )
            )
        elif message.is_int():  # a delayed message fired
            fired = statefun.egress_message_builder("e/fired", value=message.as_int(), value_type=statefun.IntType)
            context.send_egress(fired)
        else:  # an answer from the local counter
            total = statefun.egress_message_builder("e/total", value=message.as_long(), value_type=statefun.LongType)
            context.send_egress(total)

    return statefun.RequestReplyHandler(functions)


def local_counter() -> sm.StatefulFunctions:
    functions = sm.StatefulFunctions()

    @functions.bind("local/counter", specs=[sm.ValueSpec("total", sm.LongType)])
    def counter(context: sm.Context, message: sm.Message) -> None:
        total = (context.storage.total or 0) + message.as_int()
        context.storage.total = total
        assert context.caller is not None
        context.send(sm.message_builder(context.caller.typename, context.caller.id, long_value=total))

    return functions


class Servers:
    """The test's HTTP servers, all stopped on exit."""

    def __init__(self) -> None:
        self.started: list[Server] = []

    async def serve(self, handle: Callable[[bytes], Any]) -> Server:
        s = Server(handle)
        await s.start()
        self.started.append(s)
        return s

    async def __aenter__(self) -> Servers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.started:
            await s.aclose()


# -- tests ---------------------------------------------------------------------------------------


async def test_official_sdk_program_runs_as_a_remote_function(tmp_path: Path) -> None:
    async with Servers() as servers:
        await _test_official_sdk_program_runs_as_a_remote_function(tmp_path, servers)


async def _test_official_sdk_program_runs_as_a_remote_function(tmp_path: Path, servers: Servers) -> None:
    handler = official_greeter()
    server = await servers.serve(handler.handle_async)
    module = module_file(tmp_path, ("remote.example/*", server.port, ""))
    async with sm.LocalMesh(local_counter(), peers=2, module=module, state_dir=tmp_path / "state") as mesh:
        for name in ("Ada", "Bob", "Cy"):
            await mesh.send(sm.message_builder("remote.example/greeter", "g1", str_value=name))
        await settle(mesh, lambda: False, timeout=0.5)  # let delayed messages fire
        await settle(mesh)
        kafka = [r.as_kafka() for r in await egress(mesh, "e/kafka")]
        assert [(k.topic, k.key, k.value) for k in kafka] == [
            ("greetings", "Ada", b"hello Ada #1"),
            ("greetings", "Bob", b"hello Bob #2"),
            ("greetings", "Cy", b"hello Cy #3"),
        ]
        assert sorted(r.as_int() for r in await egress(mesh, "e/fired")) == [1, 3]  # t2 was cancelled
        assert sorted(r.as_long() for r in await egress(mesh, "e/total")) == [1, 2, 3]
        # the peer owning g1 registered the state the function asked for
        (remote,) = [p.remote for p in mesh.peers if "remote.example/greeter" in p.remote.specs]
        assert set(remote.specs["remote.example/greeter"]) == {"seen", "names"}
        spec = remote.specs["remote.example/greeter"]["names"]
        assert (spec.typename, spec.mode, spec.expire_ms) == ("example/names", 2, 86_400_000)
    # the state is in the mesh's store: a new mesh on the same directory sends it to the function
    async with sm.LocalMesh(local_counter(), peers=2, module=module, state_dir=tmp_path / "state") as mesh:
        await mesh.send(sm.message_builder("remote.example/greeter", "g1", str_value="Di"))
        await settle(mesh)
        assert [r.as_kafka().value for r in await egress(mesh, "e/kafka")][-1] == b"hello Di #4"


async def test_statefun_mesh_functions_served_by_our_handler(tmp_path: Path) -> None:
    async with Servers() as servers:
        await _test_statefun_mesh_functions_served_by_our_handler(tmp_path, servers)


async def _test_statefun_mesh_functions_served_by_our_handler(tmp_path: Path, servers: Servers) -> None:
    remote_functions = sm.StatefulFunctions()

    @remote_functions.bind("svc/echo", specs=[sm.ValueSpec("count", sm.IntType, expire_after_write=timedelta(hours=1))])
    def echo(context: sm.Context, message: sm.Message) -> None:
        context.storage.count = (context.storage.count or 0) + 1
        context.send_egress(
            sm.egress_message_builder("e/echo", f"{message.as_string()}:{context.storage.count}", sm.StringType)
        )

    server = await servers.serve(sm.RequestReplyHandler(remote_functions).handle_async)
    module = module_file(tmp_path, ("svc/echo", server.port, "  maxNumBatchRequests: 7\n"))
    async with sm.LocalMesh(sm.StatefulFunctions(), module=module) as mesh:
        for i in range(30):
            await mesh.send(sm.message_builder("svc/echo", "one", str_value=str(i)))
        await settle(mesh)
        values = [r.as_string() for r in await egress(mesh, "e/echo")]
        assert values == [f"{i}:{i + 1}" for i in range(30)]  # in order, each exactly once
        # batched: fewer requests than messages, none over maxNumBatchRequests
        assert max(server.batch_sizes) <= 7
        assert server.requests < 30 + 2


async def test_bad_endpoints_dead_letter_only_their_messages(tmp_path: Path) -> None:
    async with Servers() as servers:
        await _test_bad_endpoints_dead_letter_only_their_messages(tmp_path, servers)


async def _test_bad_endpoints_dead_letter_only_their_messages(tmp_path: Path, servers: Servers) -> None:
    good = sm.StatefulFunctions()

    @good.bind("ok/fn")
    def ok(context: sm.Context, message: sm.Message) -> None:
        context.send_egress(sm.egress_message_builder("e/ok", message.as_string(), sm.StringType))

    good_server = await servers.serve(sm.RequestReplyHandler(good).handle_async)

    async def status_500(body: bytes) -> web.Response:
        return web.Response(status=500, text="boom")

    async def garbage(body: bytes) -> bytes:
        return b"\xff\xff\xff\xff"

    async def slow(body: bytes) -> bytes:
        await asyncio.sleep(2)  # past the 1 s call timeout
        return b""

    undeclared = sm.StatefulFunctions()
    undeclared.register("bad/undeclared", lambda c, m: None)

    async def undeclared_state(body: bytes) -> bytes:
        from statefun_mesh.remote.protocol import FromFunction

        answer = FromFunction()
        mutation = answer.invocation_result.state_mutations.add()
        mutation.state_name, mutation.mutation_type = "ghost", 1
        mutation.state_value.typename = "io.statefun.types/int"
        return answer.SerializeToString()  # type: ignore[no-any-return]

    s500 = await servers.serve(status_500)
    sgarbage = await servers.serve(garbage)
    sslow = await servers.serve(slow)
    sundeclared = await servers.serve(undeclared_state)
    down = web.TCPSite  # a port nobody listens on: bind and close one
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down_port = sock.getsockname()[1]
    del down
    fast = "  transport:\n    timeouts: {call: 1 sec, connect: 500 ms, read: 500 ms, write: 500 ms}\n"
    module = module_file(
        tmp_path,
        ("ok/fn", good_server.port, fast),
        ("bad/500", s500.port, fast),
        ("bad/garbage", sgarbage.port, fast),
        ("bad/slow", sslow.port, fast),
        ("bad/down", down_port, fast),
        ("bad/undeclared", sundeclared.port, fast),
    )
    async with sm.LocalMesh(sm.StatefulFunctions(), module=module) as mesh:
        for target in ("bad/500", "bad/garbage", "bad/slow", "bad/down", "bad/undeclared"):
            await mesh.send(sm.message_builder(target, "x", str_value="lost?"))
        for i in range(5):
            await mesh.send(sm.message_builder("ok/fn", str(i), str_value=f"fine {i}"))
        await settle(mesh, lambda: len(mesh.peers[0].egress_read(sm.DEAD_LETTERS, 0, 100)) >= 5)
        assert sorted(r.as_string() for r in await egress(mesh, "e/ok")) == [f"fine {i}" for i in range(5)]
        letters = {
            json.loads(r.raw_value())["target_typename"]: json.loads(r.raw_value())
            for r in await egress(mesh, sm.DEAD_LETTERS)
        }
        assert set(letters) == {"bad/500", "bad/garbage", "bad/slow", "bad/down", "bad/undeclared"}
        assert "HTTP 500" in letters["bad/500"]["error"] and "gave up" in letters["bad/500"]["error"]
        assert "not a FromFunction" in letters["bad/garbage"]["error"]
        assert "never declared" in letters["bad/undeclared"]["error"]
        assert "gave up" in letters["bad/down"]["error"]
        assert "call timeout" in letters["bad/slow"]["error"]
        assert s500.requests > 1  # retried
        assert sgarbage.requests == 1  # a protocol error is not retried


async def test_client_sends_to_remote_types_are_accepted_and_unknown_ones_refused(tmp_path: Path) -> None:
    module = module_file(tmp_path, ("remote.example/*", 9, ""))
    async with sm.LocalMesh(sm.StatefulFunctions(), module=module) as mesh:
        peer = mesh.peers[0]
        assert peer.is_remote("remote.example/anything") and not peer.is_remote("other/fn")
        with pytest.raises(sm.FunctionNotFoundError):
            await mesh.send(sm.message_builder("other/fn", "1", int_value=1))


async def test_bad_module_file_fails_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "module.yaml"
    path.write_text("kind: io.statefun.kafka.v1/ingress\nspec: {}\n")
    with pytest.raises(sm.ConfigError, match=r"kafka\.v1/ingress"):
        sm.LocalMesh(sm.StatefulFunctions(), module=str(path))


def python_module(tmp_path: Path, ref: str) -> str:
    path = tmp_path / "module.yaml"
    path.write_text(
        "kind: io.statefun.endpoints.v2/http\n"
        "spec:\n"
        "  functions: remote.example/*\n"
        f"  urlPathTemplate: python:{ref}\n"
        "  transport: {timeouts: {call: 2 sec, connect: 1 sec, read: 1 sec, write: 1 sec}}\n"
    )
    return str(path)


async def test_official_sdk_handler_called_in_process_without_http(tmp_path: Path) -> None:
    # tests/integration/remote_app.py imports only the official SDK; its handler runs in the peer.
    pytest.importorskip("statefun", reason="the official SDK (apache-flink-statefun, in the dev extra)")
    module = python_module(tmp_path, "tests.integration.remote_app:handler")
    async with sm.LocalMesh(sm.StatefulFunctions(), module=module) as mesh:
        for _ in range(4):
            await mesh.send(sm.message_builder("remote.example/counter", "a", int_value=1))
        await settle(mesh, lambda: len(mesh.peers[0].egress_read("e/ticks", 0, 10)) >= 2)
        counts = [json.loads(r.as_string())["count"] for r in await egress(mesh, "e/counts")]
        ticks = sorted(json.loads(r.as_string())["n"] for r in await egress(mesh, "e/ticks"))
        assert counts == [1, 2, 3, 4] and ticks == [1, 3]
        assert mesh.peers[0].remote.requests >= 2  # the first one was answered with the specs


async def test_in_process_handler_errors(tmp_path: Path) -> None:
    with pytest.raises(sm.ConfigError, match="cannot import the handler"):
        sm.LocalMesh(sm.StatefulFunctions(), module=python_module(tmp_path, "no.such.module:handler"))
    with pytest.raises(sm.ConfigError, match="not a request-reply handler"):
        sm.LocalMesh(sm.StatefulFunctions(), module=python_module(tmp_path, "json:dumps"))
    boom = sm.StatefulFunctions()

    @boom.bind("remote.example/boom")
    def explode(context: sm.Context, message: sm.Message) -> None:
        raise RuntimeError("kaput")

    global BOOM_HANDLER
    BOOM_HANDLER = sm.RequestReplyHandler(boom)
    module = python_module(tmp_path, f"{__name__}:BOOM_HANDLER")
    async with sm.LocalMesh(sm.StatefulFunctions(), module=module) as mesh:
        await mesh.send(sm.message_builder("remote.example/boom", "x", int_value=1))
        await settle(mesh, lambda: len(mesh.peers[0].egress_read(sm.DEAD_LETTERS, 0, 10)) >= 1)
        (letter,) = [json.loads(r.raw_value()) for r in await egress(mesh, sm.DEAD_LETTERS)]
        assert "RuntimeError: kaput" in letter["error"]


BOOM_HANDLER: Any = None


async def test_an_oversized_answer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statefun_mesh.remote import invoker

    monkeypatch.setattr(invoker, "MAX_RESPONSE_BYTES", 1000)

    async def huge(body: bytes) -> web.StreamResponse:
        return web.Response(body=b"\x00" * 5000, content_type="application/octet-stream")

    async def huge_chunked(body: bytes) -> web.StreamResponse:
        async def chunks() -> Any:
            for _ in range(5):
                yield b"\x00" * 1000

        return web.Response(body=chunks(), content_type="application/octet-stream")

    async with Servers() as servers:
        s1 = await servers.serve(huge)
        s2 = await servers.serve(huge_chunked)
        module = module_file(tmp_path, ("big/a", s1.port, ""), ("big/b", s2.port, ""))
        async with sm.LocalMesh(sm.StatefulFunctions(), module=module) as mesh:
            await mesh.send(sm.message_builder("big/a", "x", int_value=1))
            await mesh.send(sm.message_builder("big/b", "x", int_value=1))
            await settle(mesh, lambda: len(mesh.peers[0].egress_read(sm.DEAD_LETTERS, 0, 10)) >= 2)
            errors = sorted(json.loads(r.raw_value())["error"] for r in await egress(mesh, sm.DEAD_LETTERS))
            assert "5,000 bytes, over 1,000" in errors[0] and "over 1,000 bytes" in errors[1]
            assert s1.requests == 1 and s2.requests == 1  # not retried


async def test_a_slow_remote_address_stalls_only_itself(tmp_path: Path) -> None:
    """One address whose endpoint does not answer for seconds is parked like an awaiting async
    function: other remote addresses and local functions on the same peer go on, and the slow
    address's messages still apply in order, exactly once."""
    async with Servers() as servers:
        remote_functions = sm.StatefulFunctions()
        gate = asyncio.Event()

        @remote_functions.bind("slow/fn", specs=[sm.ValueSpec("n", sm.IntType)])
        def fn(context: sm.Context, message: sm.Message) -> None:
            context.storage.n = (context.storage.n or 0) + 1
            record = f"{context.address.id}:{message.as_string()}:{context.storage.n}"
            context.send_egress(sm.egress_message_builder("e/slow", record, sm.StringType))

        handler = sm.RequestReplyHandler(remote_functions)

        async def handle(body: bytes) -> bytes:
            from statefun_mesh.remote.protocol import ToFunction

            if ToFunction.FromString(body).invocation.target.id == "stuck":
                await gate.wait()
            return await handler.handle_async(body)

        server = await servers.serve(handle)
        local = sm.StatefulFunctions()

        @local.bind("local/echo")
        def echo(context: sm.Context, message: sm.Message) -> None:
            context.reply(str_value=message.as_string())

        module = module_file(tmp_path, ("slow/fn", server.port, ""))
        async with sm.LocalMesh(local, module=module, state_dir=tmp_path / "state") as mesh:
            for i in range(3):
                await mesh.send(sm.message_builder("slow/fn", "stuck", str_value=str(i)))
            await asyncio.sleep(0.3)  # the stuck address is parked by now
            loop = asyncio.get_running_loop()
            for i in range(20):
                t0 = loop.time()
                reply = await mesh.request(sm.message_builder("local/echo", f"e{i}", str_value=str(i)), timeout=5)
                assert reply.as_string() == str(i) and loop.time() - t0 < 1.0
                await mesh.send(sm.message_builder("slow/fn", "other", str_value=str(i)))
            for _ in range(200):  # not mesh.idle(): a parked address keeps its peer busy
                if len(await egress(mesh, "e/slow")) >= 20:
                    break
                await asyncio.sleep(0.05)
            assert len(await egress(mesh, "e/slow")) == 20
            assert not [r for r in await egress(mesh, "e/slow") if r.as_string().startswith("stuck")]
            gate.set()
            await settle(mesh)
            values = [r.as_string() for r in await egress(mesh, "e/slow")]
            assert [v for v in values if v.startswith("stuck")] == ["stuck:0:1", "stuck:1:2", "stuck:2:3"]
            assert [v for v in values if v.startswith("other")] == [f"other:{i}:{i + 1}" for i in range(20)]
