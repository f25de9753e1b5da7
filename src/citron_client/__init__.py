"""citron_client: runners, backends and fronts for a citron server.

- :class:`Client`: the backend's and the front's asyncio client;
- :class:`Runner`, :class:`BuildContext`, :class:`RunnerHost`,
  :func:`run_runner`: write a custom runner in a few lines;
- :class:`SimpleRunner`: the runner behind ``citron-runner`` (git + bash);
- :class:`SecretMasker`: masks secret values in streamed output.
"""

import logging

from .api import Client, FollowEvent
from .connection import (
    AuthError,
    Backoff,
    ClientError,
    ConnectError,
    ConnectionLost,
    RequestError,
)
from .masking import SecretMasker
from .runner import BuildContext, Runner, RunnerHost, run_runner
from .simple import SimpleRunner

# A library logs; the application decides where to (citron-runner does).
logging.getLogger("citron").addHandler(logging.NullHandler())

__all__ = [
    "AuthError",
    "Backoff",
    "BuildContext",
    "Client",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "FollowEvent",
    "RequestError",
    "Runner",
    "RunnerHost",
    "SecretMasker",
    "SimpleRunner",
    "run_runner",
]
