"""Coverage-guided fuzzing of the decoder and the hub with atheris.

    pip install atheris
    python fuzz/fuzz_decode.py -max_total_time=600

The decoder must return a message or raise ProtocolError for any text, and a
decoded message must encode back to a frame that decodes to it. The hub must
answer any frame without raising. A crash is written as ``crash-*`` in the
working directory; rerun it with ``python fuzz/fuzz_decode.py crash-...``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from citron_protocol import CountingIds, Hub, ProtocolError, Role, decode, encode

# Frame heads to build on: random text alone rarely gets past the grammar.
HEADS = [
    "RUNNER:init:", "RUNNER:process:", "RUNNER:unregister:", "API:run:", "API:cancel:",
    "API:get_builds:", "WEB:subscribe:", "WEB:get_build:", "run:", "log:", "state:", "builds:",
    "error:", "",
]

_hub = Hub(CountingIds())
_hub.connect(1, list(Role), 0.0)
_hub.connect(2, [Role.WEB], 0.0)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    head = HEADS[fdp.ConsumeIntInRange(0, len(HEADS) - 1)]
    text = head + fdp.ConsumeUnicodeNoSurrogates(len(data))
    try:
        message = decode(text)
    except ProtocolError:
        pass
    else:
        assert decode(encode(message)) == message
    for conn in (1, 2):
        fx = _hub.receive(conn, text, 0.0)
        for closed in fx.closes:
            _hub.disconnect(closed.conn, 0.0)
            _hub.connect(closed.conn, list(Role) if closed.conn == 1 else [Role.WEB], 0.0)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
