"""A peer embedded in an aiohttp web service: HTTP answers come from function state.

The service runs one peer of a mesh inside its own event loop (``async with Peer(...)``)
and serves:

- ``POST /visit/{name}``  sends a visit to ``example/person`` (the greeter's function)
- ``GET  /greet/{name}``  requests a greeting and returns it as JSON

    python -m examples.web_service --port 8080 --state-dir ./web-state
    curl -X POST localhost:8080/visit/Alice; curl localhost:8080/greet/Alice

A peer of a larger mesh is embedded the same way: pass the mesh's MeshConfig
(``load_config("mesh.toml")``) and this process's ``peer_id``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import AsyncIterator

from aiohttp import web

from examples.greeter import functions
from statefun_mesh import MeshConfig, Peer, StatefunMeshError, message_builder

PEER: web.AppKey[Peer] = web.AppKey("peer", Peer)


async def visit(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[PEER].send(message_builder(target_typename="example/person", target_id=name, str_value=name))
    return web.json_response({"queued": name}, status=202)


async def greet(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        reply = await request.app[PEER].request(
            message_builder(target_typename="example/person", target_id=name, str_value=name), timeout=5.0
        )
    except StatefunMeshError as exc:
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response({"greeting": reply.as_string()})


def make_app(config: MeshConfig, peer_id: int = 0) -> web.Application:
    """The web application; its peer starts and stops with it."""
    app = web.Application()
    app.router.add_post("/visit/{name}", visit)
    app.router.add_get("/greet/{name}", greet)

    async def peer_context(app: web.Application) -> AsyncIterator[None]:
        async with Peer(config, functions, peer_id=peer_id) as peer:
            app[PEER] = peer
            yield

    app.cleanup_ctx.append(peer_context)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="An HTTP service with an embedded statefun_mesh peer.")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--state-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        state_dir = args.state_dir or stack.enter_context(tempfile.TemporaryDirectory())
        web.run_app(make_app(MeshConfig(state_dir=state_dir)), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()

__all__ = ["make_app"]
