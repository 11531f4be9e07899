"""The ``nats-ingress`` and ``nats-egress`` commands: bridge NATS JetStream into and out of a mesh."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError
from .common import DEFAULT_ENDPOINT, _add_client_key_arg, _add_log_args, _client_keys, _endpoint, _setup_logging, log


def _export_client_key(args: argparse.Namespace) -> None:
    """For the NATS bridges: check ``--client-key`` lists ``--mesh`` and leave it where the
    bridge's ``MeshClient`` finds it (``$STATEFUN_MESH_CLIENT_KEY``)."""
    if not args.client_key:
        return
    from ..security import ENV_CLIENT_KEY

    keys = _client_keys(args)
    if keys.server_key(args.mesh) is None:
        raise ConfigError(
            f"the client key file {args.client_key} lists no public key for {args.mesh} in its [server_keys]",
            key="client_key",
        )
    os.environ[ENV_CLIENT_KEY] = args.client_key


def cmd_nats_ingress(args: argparse.Namespace) -> int:
    """Bridge a NATS JetStream stream into the mesh until SIGTERM/SIGINT."""
    from ..connectors.nats import NatsIngress, NatsIngressConfig

    _setup_logging(args.log_level, "nats-ingress ", args.log_format)
    _export_client_key(args)
    config = NatsIngressConfig(
        stream=args.stream,
        durable=args.durable,
        nats_url=args.nats_url,
        mesh_endpoint=args.mesh,
        subject=args.subject,
        subject_prefix=args.subject_prefix,
        target_type=args.target_type,
        value_type=args.value_type,
        dead_letter_subject=args.dead_letter_subject,
        max_in_flight=args.max_in_flight,
        max_ack_pending=args.max_ack_pending or max(1024, args.max_in_flight),
        fetch_batch=args.fetch_batch,
        ack_wait=args.ack_wait,
        mesh_timeout=args.timeout,
        status_interval=args.status_interval,
        ordered=not args.unordered,
    )

    # a signal while still starting (e.g. waiting for NATS) stops at once, as a second one does:
    # whatever was not acked is delivered again later, and the mesh drops what it has
    return _run_bridge(
        "nats-ingress", lambda: NatsIngress(config), lambda b: b.stats.line(0), stop_now=lambda b: not b.consuming
    )


def cmd_nats_egress(args: argparse.Namespace) -> int:
    """Bridge mesh egresses into NATS JetStream until SIGTERM/SIGINT."""
    from ..connectors.nats_egress import EgressRoute, NatsEgress, NatsEgressConfig

    _setup_logging(args.log_level, "nats-egress ", args.log_format)
    _export_client_key(args)
    config = NatsEgressConfig(
        routes=tuple(EgressRoute.parse(r) for r in args.route or ()),
        name=args.name,
        nats_url=args.nats_url,
        mesh_endpoint=args.mesh,
        kv_bucket=args.kv_bucket,
        start=args.start,
        batch=args.batch,
        publish_timeout=args.publish_timeout,
        mesh_timeout=args.timeout,
        status_interval=args.status_interval,
    )

    # a second signal while stopping stops at once: whatever was acked but not recorded is
    # published again on restart and dropped by JetStream (same Nats-Msg-Id)
    return _run_bridge("nats-egress", lambda: NatsEgress(config), lambda b: b.stats.line())


_Bridge = TypeVar("_Bridge", bound="_Runs")


class _Runs(Protocol):
    async def run(self, stop: asyncio.Event) -> Any: ...


def _run_bridge(
    what: str,
    make: Callable[[], _Bridge],
    status: Callable[[_Bridge], str],
    *,
    stop_now: Callable[[_Bridge], bool] = lambda _b: False,
) -> int:
    """Run the bridge ``make()`` builds (on the loop) until SIGTERM/SIGINT asks it to stop. A second
    signal, or one while ``stop_now(bridge)``, cancels it at once; that is logged with ``status(bridge)``."""

    async def run() -> int:
        stop = asyncio.Event()
        bridge = make()
        main = asyncio.current_task()
        assert main is not None

        def on_signal() -> None:
            if stop.is_set() or stop_now(bridge):
                main.cancel()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await bridge.run(stop)
        except asyncio.CancelledError:
            log.warning("%s: stopped by a signal before finishing: %s", what, status(bridge))
        return 0

    return asyncio.run(run())


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "nats-ingress",
        help="bridge a NATS JetStream stream into the mesh, exactly once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Read a JetStream stream through a durable pull consumer and send every message into the
mesh with an idempotency key: the Nats-Msg-Id header, else <stream>:<sequence>@<stream
creation ms>. A message is acked to JetStream only after the mesh acknowledged it (it is
then in a peer's ingress log), so a crash of this process leads to redelivery, which the
mesh drops: every message affects function state exactly once. Runs until Ctrl-C or
SIGTERM. Needs nats-py: pip install 'statefun-mesh[nats]'.""",
        epilog="""\
mapping of a NATS message to a mesh message:
  target type   header Statefun-Target-Type, else --target-type, else the subject
  target id     header Statefun-Target-Id, else the subject
  subject       after --subject-prefix: <namespace>.<name>.<id>, or <id> alone when the
                type is known (the id may then contain dots)
  value type    header Statefun-Value-Type, else --value-type; for io.statefun.types/
                string, int, long, float, double and bool the payload is the value as
                text ("42", "true"); for any other type it is the value's bytes, as is
  unmappable    bad headers or subject, a payload that is not its type, a function type
                the mesh does not know: logged and terminated (after publishing it to
                --dead-letter-subject, if given); never blocks the messages behind it

example:
  statefun-mesh run examples.greeter:functions --peers 2
  nats stream add ORDERS --subjects 'orders.>' --defaults
  statefun-mesh nats-ingress --stream ORDERS --subject 'orders.>' --durable mesh
  nats pub orders.example.person.Alice Alice      # -> example/person, id Alice

See docs/connectors.md.""",
    )
    g = p.add_argument_group("source (NATS JetStream)")
    g.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        metavar="URL",
        help="NATS server URL, several comma-separated (default: $NATS_URL or nats://127.0.0.1:4222)",
    )
    g.add_argument("--stream", required=True, help="the JetStream stream to read (it must exist)")
    g.add_argument(
        "--durable",
        required=True,
        metavar="NAME",
        help="durable consumer name: created, or updated to these settings; restart with the same "
        "name to go on where the last run stopped",
    )
    g.add_argument(
        "--subject",
        metavar="SUBJECT",
        help="consumer filter subject, e.g. 'orders.>' (default: every subject of the stream)",
    )
    g.add_argument(
        "--max-ack-pending",
        type=int,
        metavar="N",
        help="the consumer's limit of delivered, unacked messages (default: 1024, at least --max-in-flight)",
    )
    g.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="redeliver a message not acked within this time (default: %(default)s; also how soon "
        "messages held by a crashed bridge come again)",
    )
    g.add_argument(
        "--fetch-batch", type=int, default=128, metavar="N", help="messages asked for per fetch (default: %(default)s)"
    )
    g = p.add_argument_group("mapping")
    g.add_argument(
        "--subject-prefix",
        metavar="TOKENS",
        help="leading subject tokens that are not part of the target (default: the tokens of --subject "
        "before its first wildcard, e.g. 'orders' for 'orders.>')",
    )
    g.add_argument(
        "--target-type",
        metavar="NS/NAME",
        help="send every message to this function type; the subject (after the prefix) is the id",
    )
    g.add_argument(
        "--value-type",
        default="io.statefun.types/string",
        metavar="NS/NAME",
        help="value type of messages without a Statefun-Value-Type header (default: %(default)s)",
    )
    g.add_argument(
        "--dead-letter-subject",
        metavar="SUBJECT",
        help="publish unmappable messages here (through JetStream: a stream must capture it), with "
        "a Statefun-Error header, before terminating them (default: only log and terminate)",
    )
    g = p.add_argument_group("target (the mesh)")
    g.add_argument(
        "--mesh",
        type=_endpoint,
        default=os.environ.get("STATEFUN_MESH_ENDPOINT", DEFAULT_ENDPOINT),
        metavar="ENDPOINT",
        help="a peer's client endpoint (default: $STATEFUN_MESH_ENDPOINT or %(default)s); the other "
        "peers' endpoints are learnt from it and used when a send has to be retried",
    )
    g.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        metavar="N",
        help="messages being sent at once (default: %(default)s); messages to one function "
        "instance are sent one after another, in stream order",
    )
    g.add_argument(
        "--unordered",
        action="store_true",
        help="pipeline messages to one function instance too: faster for hot instances, but a retried "
        "send may then overtake a later one",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the mesh to acknowledge a send before retrying it (default: %(default)s)",
    )
    _add_client_key_arg(p)
    p.add_argument(
        "--status-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="log a progress line this often while something changes; 0: never (default: %(default)s)",
    )
    _add_log_args(p)
    p.set_defaults(func=cmd_nats_ingress)

    p = sub.add_parser(
        "nats-egress",
        help="publish mesh egress records to NATS JetStream, exactly once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Follow egresses on every peer and publish each record to a JetStream subject, with a
Nats-Msg-Id from the record's identity (<egress>/<peer>/<offset>, or the record id of an
immediate egress), so JetStream's duplicate window drops a record published twice. The
position (per egress and peer: the offset after the last acked record) is kept in a
JetStream key-value bucket under --name; a restart goes on from there. Waits out NATS or
the mesh being away. Runs until Ctrl-C or SIGTERM. Needs nats-py: pip install
'statefun-mesh[nats]'.""",
        epilog="""\
subject templates (--route EGRESS=TEMPLATE):
  {egress} namespace.name of the egress   {namespace} {name}   {peer}   {type}
  {topic} {key}               of a kafka_egress_message record (else _)
  {stream} {partition_key}    of a kinesis_egress_message record (else _)
  record values become one token: '.', spaces and wildcards -> '_', empty -> '_'
payload: a string/int/long/float/double/bool value as text; a Kafka/Kinesis record's
  value bytes (topic, key... in Statefun-Kafka-*/Statefun-Kinesis-* headers); any other
  value's bytes as they are. Headers: Nats-Msg-Id, Statefun-Value-Type, Statefun-Egress,
  Statefun-Peer, Statefun-Offset (and Statefun-Record-Id for immediate egress).

example:
  nats stream add OUT --subjects 'out.>' --defaults
  statefun-mesh nats-egress --name greets --route 'example/greetings=out.{peer}'

See docs/connectors.md.""",
    )
    p.add_argument(
        "--route",
        action="append",
        metavar="EGRESS=TEMPLATE",
        help="an egress and the subject template of its records, e.g. 'app/out=out.{topic}'; repeat "
        "for more egresses (at least one)",
    )
    p.add_argument(
        "--name",
        required=True,
        help="the bridge's name: the key of its position in the bucket; restart with the same name to go "
        "on (a new mesh with fresh state needs a new name)",
    )
    p.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        metavar="URL",
        help="NATS server URL, several comma-separated (default: $NATS_URL or nats://127.0.0.1:4222)",
    )
    p.add_argument(
        "--kv-bucket",
        default="statefun_mesh_egress",
        metavar="BUCKET",
        help="JetStream key-value bucket of positions, created if missing (default: %(default)s)",
    )
    p.add_argument(
        "--start",
        choices=["earliest", "latest"],
        default="earliest",
        help="where an egress without a stored position starts (default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=500,
        metavar="N",
        help="records read per fetch and published at once (default: %(default)s)",
    )
    p.add_argument(
        "--publish-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait this long for JetStream's ack before publishing again (default: %(default)s)",
    )
    p.add_argument(
        "--mesh",
        type=_endpoint,
        default=os.environ.get("STATEFUN_MESH_ENDPOINT", DEFAULT_ENDPOINT),
        metavar="ENDPOINT",
        help="a peer's client endpoint (default: $STATEFUN_MESH_ENDPOINT or %(default)s); the other "
        "peers' endpoints are learnt from it",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for a peer to answer a read before retrying (default: %(default)s)",
    )
    _add_client_key_arg(p)
    p.add_argument(
        "--status-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="log a progress line this often while something changes; 0: never (default: %(default)s)",
    )
    _add_log_args(p)
    p.set_defaults(func=cmd_nats_egress)
