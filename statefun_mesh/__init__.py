"""statefun_mesh: Stateful Functions for Python, at scale, without a Flink cluster."""

from __future__ import annotations

from ._speedups import IMPLEMENTATION as IMPLEMENTATION
from .address import Address as Address
from .address import SdkAddress as SdkAddress
from .client import MeshClient as MeshClient
from .clock import Clock as Clock
from .clock import ManualClock as ManualClock
from .clock import SystemClock as SystemClock
from .config import MeshConfig as MeshConfig
from .context import Context as Context
from .dispatch import DEAD_LETTERS as DEAD_LETTERS
from .egress_io import KafkaEgressRecord as KafkaEgressRecord
from .egress_io import KinesisEgressRecord as KinesisEgressRecord
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .functions import StatefulFunctions as StatefulFunctions
from .functions import ValueSpec as ValueSpec
from .mesh import LocalMesh as LocalMesh
from .messages import EgressMessage as EgressMessage
from .messages import EgressRecord as EgressRecord
from .messages import Message as Message
from .messages import TypedValue as TypedValue
from .messages import egress_message_builder as egress_message_builder
from .messages import kafka_egress_message as kafka_egress_message
from .messages import kinesis_egress_message as kinesis_egress_message
from .messages import message_builder as message_builder
from .offload import in_thread as in_thread
from .peer import Peer as Peer
from .remote.handler import RequestReplyHandler as RequestReplyHandler
from .security import ClientKeys as ClientKeys
from .valuetypes import BoolType as BoolType
from .valuetypes import DoubleType as DoubleType
from .valuetypes import FloatType as FloatType
from .valuetypes import IntType as IntType
from .valuetypes import LongType as LongType
from .valuetypes import MsgPackType as MsgPackType
from .valuetypes import StringType as StringType
from .valuetypes import Type as Type
from .valuetypes import TypeSerializer as TypeSerializer
from .valuetypes import make_json_type as make_json_type
from .valuetypes import make_msgpack_type as make_msgpack_type
from .valuetypes import make_protobuf_type as make_protobuf_type
from .valuetypes import simple_type as simple_type

__version__ = "0.1.0"


__all__ = [
    "DEAD_LETTERS",
    "IMPLEMENTATION",
    "Address",
    "BoolType",
    "ClientKeys",
    "Clock",
    "Context",
    "DoubleType",
    "EgressMessage",
    "EgressRecord",
    "FloatType",
    "IntType",
    "KafkaEgressRecord",
    "KinesisEgressRecord",
    "LocalMesh",
    "LongType",
    "ManualClock",
    "MeshClient",
    "MeshConfig",
    "Message",
    "MsgPackType",
    "Peer",
    "RequestReplyHandler",
    "SdkAddress",
    "StatefulFunctions",
    "StringType",
    "SystemClock",
    "Type",
    "TypeSerializer",
    "TypedValue",
    "ValueSpec",
    "__version__",
    "egress_message_builder",
    "in_thread",
    "kafka_egress_message",
    "kinesis_egress_message",
    "make_json_type",
    "make_msgpack_type",
    "make_protobuf_type",
    "message_builder",
    "simple_type",
    *_errors_all,
]
