"""citron_protocol: the ci-tron runner protocol, sans I/O.

The names here are what a runner, a backend, a front or a host uses; the
rest lives in documented submodules:

- :mod:`~citron_protocol.messages`: one frozen class per frame, and limits;
- :mod:`~citron_protocol.codec`: ``decode(text)`` and ``encode(message)``,
  and the parts of decoding a server needs (``split_client``, ...);
- :mod:`~citron_protocol.errors`: ``ProtocolError`` and its stable codes;
- :mod:`~citron_protocol.states`: the build and runner lifecycles, as tables;
- :mod:`~citron_protocol.hub`: the server's state machine (``CloseCode``,
  ``IdSource``, ``CountingIds``, ...);
- :mod:`~citron_protocol.records`: what the hub persists and reads back
  (``BuildRecord``, ``LogRecord``, ``LoadLog``, ``FindBuilds``,
  ``MemoryStore``);
- :mod:`~citron_protocol.runner`: the runner's state machine;
- :mod:`~citron_protocol.client`: request matching and following a log, for
  backends and fronts;
- :mod:`~citron_protocol.sections`: the log's section markers, to write them
  (a runner) or show them (a front);
- :mod:`~citron_protocol.strategies`: hypothesis strategies (import it
  explicitly; it needs hypothesis).

This package does no I/O: it imports no asyncio, sockets, sqlite, clock or
environment. Hosts pass time and text in, and do what comes back.
"""

from .client import (
    ClientProtocol,
    Failure,
    Follow,
    Push,
    Reply,
)
from .codec import (
    decode,
    decode_client,
    decode_server,
    encode,
)
from .errors import (
    CitronError,
    ErrorCode,
    ProtocolError,
    SnapshotError,
    UsageError,
)
from .hub import (
    Effects,
    Hub,
    HubConfig,
)
from .messages import (
    BuildInfo,
    BuildState,
    CancelBuild,
    ClientMessage,
    Error,
    GetBuild,
    GetBuilds,
    GetRunners,
    LogChunk,
    Message,
    Role,
    Run,
    RunnerChange,
    RunnerInfo,
    RunnerState,
    ServerMessage,
    StateChange,
    Step,
    StepState,
    SubmitBuild,
    Subscribe,
    Unsubscribe,
)
from .runner import (
    BuildDropped,
    BuildResumed,
    BuildStarted,
    CancelRequested,
    Registered,
    RunnerProtocol,
    RunnerProtocolEvent,
    ServerError,
    ShutdownRequested,
)
from .states import (
    RunnerPhase,
)

__all__ = [
    "BuildDropped",
    "BuildInfo",
    "BuildResumed",
    "BuildStarted",
    "BuildState",
    "CancelBuild",
    "CancelRequested",
    "CitronError",
    "ClientMessage",
    "ClientProtocol",
    "Effects",
    "Error",
    "ErrorCode",
    "Failure",
    "Follow",
    "GetBuild",
    "GetBuilds",
    "GetRunners",
    "Hub",
    "HubConfig",
    "LogChunk",
    "Message",
    "ProtocolError",
    "Push",
    "Registered",
    "Reply",
    "Role",
    "Run",
    "RunnerChange",
    "RunnerInfo",
    "RunnerPhase",
    "RunnerProtocol",
    "RunnerProtocolEvent",
    "RunnerState",
    "ServerError",
    "ServerMessage",
    "ShutdownRequested",
    "SnapshotError",
    "StateChange",
    "Step",
    "StepState",
    "SubmitBuild",
    "Subscribe",
    "Unsubscribe",
    "UsageError",
    "decode",
    "decode_client",
    "decode_server",
    "encode",
]
__version__ = "0.1.0"
