"""citron_protocol: the ci-tron runner protocol, sans I/O.

- :mod:`~citron_protocol.messages`: one frozen class per frame;
- :mod:`~citron_protocol.codec`: ``decode(text)`` and ``encode(message)``;
- :mod:`~citron_protocol.errors`: ``ProtocolError`` and its stable codes;
- :mod:`~citron_protocol.states`: the build and runner lifecycles, as tables;
- :mod:`~citron_protocol.hub`: the server's state machine;
- :mod:`~citron_protocol.records`: what the hub persists and reads back;
- :mod:`~citron_protocol.runner`: the runner's state machine;
- :mod:`~citron_protocol.client`: request matching for backends and fronts;
- :mod:`~citron_protocol.strategies`: hypothesis strategies (import it
  explicitly; it needs hypothesis).

This package does no I/O: it imports no asyncio, sockets, sqlite, clock or
environment. Hosts pass time and text in, and do what comes back.
"""

from .client import *  # noqa: F403
from .client import __all__ as _client_all
from .codec import *  # noqa: F403
from .codec import __all__ as _codec_all
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .hub import *  # noqa: F403
from .hub import __all__ as _hub_all
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .records import *  # noqa: F403
from .records import __all__ as _records_all
from .runner import *  # noqa: F403
from .runner import __all__ as _runner_all
from .states import *  # noqa: F403
from .states import __all__ as _states_all

__all__ = sorted(
    {
        *_client_all,
        *_codec_all,
        *_errors_all,
        *_hub_all,
        *_messages_all,
        *_records_all,
        *_runner_all,
        *_states_all,
    }
)
__version__ = "0.1.0"
