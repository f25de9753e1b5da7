"""Encode messages to frames and decode frames to messages.

One table, :data:`CLIENT_COMMANDS` and :data:`SERVER_COMMANDS`, maps each
command to its message class; one cattrs converter maps payloads to classes
and back, so encoding and decoding cannot disagree.

Decoding is total: for any ``str``, :func:`decode` returns a message or raises
a :class:`~citron_protocol.errors.ProtocolError`. Runner payloads that are not
strict JSON get the legacy repair (see :func:`repair_legacy_payload`).
Encoding always emits strict, compact JSON.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import attrs
import cattrs
import msgspec
import orjson
from cattrs.errors import BaseValidationError, ClassValidationError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .errors import (
    ErrorCode,
    Forbidden,
    InvalidPayload,
    MalformedFrame,
    ProtocolError,
    UnknownCommand,
    UnknownRole,
)
from .messages import (
    MAX_INT,
    MAX_NAME_BYTES,
    Ack,
    BuildInfo,
    BuildReply,
    Builds,
    BuildState,
    Cancel,
    CancelBuild,
    ClientMessage,
    Error,
    FieldError,
    GetBuild,
    GetBuilds,
    GetRunners,
    LogChunk,
    Message,
    Queued,
    Ready,
    Resume,
    ResumePoint,
    Role,
    Run,
    RunnerChange,
    RunnerFinished,
    RunnerInfo,
    RunnerInit,
    RunnerLog,
    Runners,
    RunnerState,
    RunnerUnregister,
    ServerMessage,
    Shutdown,
    ShutdownRunner,
    StateChange,
    Step,
    StepState,
    SubmitBuild,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    _RunnerLogSlots,
    utf8_size,
)

__all__ = [
    "as_data",
    "CLIENT_COMMANDS",
    "SERVER_COMMANDS",
    "answer_unavailable",
    "decode",
    "decode_client",
    "decode_server",
    "encode",
    "encode_log_chunk",
    "log_time",
    "fast_runner_log",
    "frame_head",
    "parse_client",
    "peek_req",
    "repair_legacy_payload",
    "split_client",
]

_ROLE_RE: Final = re.compile(r"[A-Z]+")
_COMMAND_RE: Final = re.compile(r"[a-z_]+")
_ROLES: Final = {r.value: r for r in Role}

#: Client commands: command -> the roles that may send it -> the class(es).
#: ``process`` has two classes, told apart by the payload's ``finished``.
CLIENT_COMMANDS: Final[Mapping[str, Mapping[Role, tuple[type[ClientMessage], ...]]]] = {
    "init": {Role.RUNNER: (RunnerInit,)},
    "process": {Role.RUNNER: (RunnerLog, RunnerFinished)},
    "unregister": {Role.RUNNER: (RunnerUnregister,)},
    "run": {Role.API: (SubmitBuild,)},
    "cancel": {Role.API: (CancelBuild,)},
    "shutdown_runner": {Role.API: (ShutdownRunner,)},
    **{
        cls.COMMAND: {Role.API: (cls,), Role.WEB: (cls,)}
        for cls in (GetRunners, GetBuilds, GetBuild, Subscribe, Unsubscribe)
    },
}

#: Server commands: command -> class.
SERVER_COMMANDS: Final[Mapping[str, type[ServerMessage]]] = {
    cls.COMMAND: cls
    for cls in (
        Ready,
        Run,
        Cancel,
        Shutdown,
        Ack,
        Queued,
        BuildReply,
        Runners,
        Builds,
        Subscribed,
        Unsubscribed,
        LogChunk,
        StateChange,
        RunnerChange,
        Error,
    )
}

#: Commands whose canonical frame has an empty payload when no field is set.
_EMPTY_WHEN_BARE: Final = frozenset({"unregister", "shutdown", "get_runners"})

# -- the converter --------------------------------------------------------------------

_converter: Final = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
"""The one converter of payloads to messages and back.

Primitive fields pass through unchanged, and the message classes' validators
check them, so a wrong type is named with its field (``$.seq: expected an
integer``) instead of being coerced (cattrs' default turns ``5`` into ``"5"``).
"""


def _passthrough(value: Any, _: Any) -> Any:
    return value


for _t in (str, int, float, bool):
    _converter.register_structure_hook(_t, _passthrough)
_PASSTHROUGH_TYPES: Final = (
    tuple[str, ...],
    dict[str, str],
    tuple[BuildInfo, ...],
    tuple[RunnerInfo, ...],
)
_converter.register_structure_hook_func(lambda t: t in _PASSTHROUGH_TYPES, _passthrough)


def _enum_or_raw(value: Any, kind: type[StrEnum]) -> Any:
    try:
        return kind(value)
    except (ValueError, TypeError):
        return value  # the class's validator names the field and the choices


for _e in (BuildState, RunnerState, Role, StepState):
    _converter.register_structure_hook(_e, _enum_or_raw)


class _NotAnObject(TypeError):
    pass


def _object_hook(cls: type[Any]) -> Callable[[Any, Any], Any]:
    renames = {"from_": override(rename="from")} if "from_" in attrs.fields_dict(cls) else {}
    inner = make_dict_structure_fn(cls, _converter, **renames)  # type: ignore[arg-type]

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise _NotAnObject("expected an object")
        return inner(value, cls)

    return structure


for _obj in (Resume, ResumePoint, RunnerInfo, BuildInfo, Step):
    _converter.register_structure_hook(_obj, _object_hook(_obj))
    _converter.register_unstructure_hook(_obj, make_dict_unstructure_fn(_obj, _converter))


def _structure_steps(value: Any, _: Any) -> tuple[Step, ...] | None:
    """A ``steps`` list: each problem named with its index (``[2].state``)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise TypeError("expected a list of steps")
    return _structure_items(value, Step)


_converter.register_structure_hook(tuple[Step, ...] | None, _structure_steps)

# Messages: a payload's absent keys are the fields' defaults, and encoding
# leaves out every field that is None (and ``protocol: 0`` of a legacy init).
_STRUCTURE: dict[type[Any], Callable[[dict[str, Any]], Any]] = {}
_UNSTRUCTURE: dict[type[Any], Callable[[Any], dict[str, Any]]] = {}


def _register_message(cls: type[Any], omit: bool = True) -> None:
    renames = {"from_": override(rename="from")} if "from_" in attrs.fields_dict(cls) else {}
    structure = make_dict_structure_fn(cls, _converter, **renames)  # type: ignore[arg-type]
    unstructure = make_dict_unstructure_fn(
        cls,
        _converter,
        _cattrs_omit_if_default=omit,
        **renames,  # type: ignore[arg-type]
    )
    _STRUCTURE[cls] = lambda d: structure(d, cls)
    _UNSTRUCTURE[cls] = unstructure


for _cls in (
    RunnerInit,
    RunnerLog,
    RunnerFinished,
    RunnerUnregister,
    SubmitBuild,
    CancelBuild,
    ShutdownRunner,
    GetRunners,
    GetBuilds,
    GetBuild,
    Subscribe,
    Unsubscribe,
    Ready,
    Run,
    Cancel,
    Shutdown,
    Ack,
    Queued,
    LogChunk,
    Error,
):
    _register_message(_cls)
# ``subscribed``/``unsubscribed`` always carry build and from, null or not.
_register_message(Subscribed, omit=False)
_register_message(Unsubscribed, omit=False)


def _structure_list(items: Any, cls: type[Any], key: str) -> tuple[Any, ...]:
    if not isinstance(items, list):
        raise FieldError(key, "expected a list")
    try:
        return _structure_items(items, cls)
    except _PathError as exc:
        raise _PathError(key, exc) from exc


def _structure_items(items: list[Any], cls: type[Any]) -> tuple[Any, ...]:
    """Each item of a list as ``cls``; a problem is named by its index."""
    out = []
    hook = _converter.get_structure_hook(cls)
    for i, item in enumerate(items):
        try:
            out.append(hook(item, cls))
        except Exception as exc:
            raise _PathError(f"[{i}]", exc) from exc
    return tuple(out)


class _PathError(Exception):
    def __init__(self, path: str, exc: Exception) -> None:
        super().__init__(path)
        self.path = path
        self.exc = exc


def _without_req(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "req"}


_STRUCTURE[BuildReply] = lambda d: BuildReply(
    build=_converter.structure(_without_req(d), BuildInfo), req=d.get("req")
)
_STRUCTURE[StateChange] = lambda d: StateChange(build=_converter.structure(d, BuildInfo))
_STRUCTURE[RunnerChange] = lambda d: RunnerChange(
    runner=_converter.structure({k: v for k, v in d.items() if k != "gone"}, RunnerInfo),
    gone=d.get("gone", False),
)
_STRUCTURE[Runners] = lambda d: Runners(
    runners=_structure_list(_require(d, "runners"), RunnerInfo, "runners"),
    req=d.get("req"),
    more=d.get("more", False),
)
_STRUCTURE[Builds] = lambda d: Builds(
    builds=_structure_list(_require(d, "builds"), BuildInfo, "builds"),
    req=d.get("req"),
    more=d.get("more", False),
)


def _require(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise KeyError(key)
    return d[key]


def _with_req(d: dict[str, Any], req: str | None) -> dict[str, Any]:
    if req is not None:
        d["req"] = req
    return d


_UNSTRUCTURE[BuildReply] = lambda m: _with_req(_converter.unstructure(m.build), m.req)
_UNSTRUCTURE[StateChange] = lambda m: _converter.unstructure(m.build)
_UNSTRUCTURE[RunnerChange] = lambda m: (
    {**_converter.unstructure(m.runner), "gone": True}
    if m.gone
    else _converter.unstructure(m.runner)
)
_UNSTRUCTURE[Runners] = lambda m: _with_req(
    {
        "runners": [_converter.unstructure(r) for r in m.runners],
        **({"more": True} if m.more else {}),
    },
    m.req,
)
_UNSTRUCTURE[Builds] = lambda m: _with_req(
    {"builds": [_converter.unstructure(b) for b in m.builds], **({"more": True} if m.more else {})},
    m.req,
)

# -- errors with paths ------------------------------------------------------------------


def _describe(exc: BaseException, path: str) -> list[str]:
    """Turn a structuring failure into ``$.path: problem`` sentences."""
    if isinstance(exc, _PathError):
        sep = "" if exc.path.startswith("[") else "."
        return _describe(exc.exc, f"{path}{sep}{exc.path}")
    if isinstance(exc, FieldError):
        sep = "" if exc.field.startswith("[") else "."
        return [f"{path}{sep}{exc.field}: {exc.problem}"]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        out: list[str] = []
        placed, others = exc.group_exceptions()
        for sub, note in placed:
            where = f".{note.name}" if hasattr(note, "name") else f"[{note.index}]"
            out += _describe(sub, path + where)
        for sub in others:
            out += _describe(sub, path)
        return out
    if isinstance(exc, BaseValidationError):
        return [f"{path}: {exc.message}"]
    if isinstance(exc, KeyError):
        return [f"{path}: required field missing"]
    if isinstance(exc, _NotAnObject):
        return [f"{path}: expected an object"]
    return [f"{path}: {exc}"]


def _req_of(payload: object) -> str | None:
    """A payload's ``req``, to echo: a string of at most ``MAX_NAME_BYTES``
    (a longer one is refused, and not sent back)."""
    if isinstance(payload, dict):
        req = payload.get("req")
        if isinstance(req, str) and utf8_size(req) <= MAX_NAME_BYTES:
            return req
    return None


def _defaulted_keys(cls: type[Any]) -> frozenset[str]:
    """The payload keys of ``cls`` whose default is not null: null there
    means the default (docs/protocol.md §1.1)."""
    if not attrs.has(cls):
        return frozenset()
    return frozenset(
        "from" if a.name == "from_" else a.name
        for a in attrs.fields(cls)
        if a.default is not attrs.NOTHING and a.default is not None and a.init
    )


_DEFAULTED: dict[type[Any], frozenset[str]] = {}


def _structure(cls: type[Any], payload: dict[str, Any], **extra: Any) -> Any:
    keys = _DEFAULTED.get(cls)
    if keys is None:
        keys = _DEFAULTED[cls] = _defaulted_keys(cls)
    if keys and any(payload.get(k, 0) is None for k in keys):
        payload = {k: v for k, v in payload.items() if v is not None or k not in keys}
    try:
        if extra:
            return _STRUCTURE[cls]({**payload, **extra})
        return _STRUCTURE[cls](payload)
    except Exception as exc:  # noqa: BLE001 - every failure is the payload's fault
        problems = _describe(exc, "$")
        raise InvalidPayload("; ".join(problems), req=_req_of(payload)) from None


# -- legacy repair --------------------------------------------------------------------

_PAIR_RE: Final = re.compile(r"\\(.)", re.DOTALL)


def _repair_pair(m: re.Match[str]) -> str:
    c = m.group(1)
    if c == "'":
        return "'"
    if c == "0":
        return "\\u0000"
    return m.group(0)


def repair_legacy_payload(payload: str) -> str:
    """Undo PHP's ``addslashes`` where it is not JSON.

    Backslash pairs are read left to right, each as a unit: ``\\'`` becomes
    ``'``, ``\\0`` becomes ``\\u0000``, every other pair is kept. Raw control
    characters are left for a non-strict JSON parser.
    """
    if "\\" not in payload:
        return payload
    return _PAIR_RE.sub(_repair_pair, payload)


def _has_surrogate(value: object) -> bool:
    """Whether a parsed value holds a lone surrogate anywhere. Iterative: a
    payload nested deeper than Python's recursion limit is checked too."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(payload: str, tolerant: bool) -> Any:
    """Parse a payload: strict JSON, then (runner frames) the legacy repair."""
    if not payload:
        return {}
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as strict_error:
        if not tolerant:
            raise InvalidPayload(f"payload is not JSON: {strict_error}") from None
    try:
        value = json.loads(
            repair_legacy_payload(payload), strict=False, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        raise InvalidPayload(f"payload is not JSON: {exc}") from None
    if _has_surrogate(value):
        raise InvalidPayload("payload is not JSON: lone surrogate in a string")
    return value


# -- the hot path ------------------------------------------------------------------
#
# A runner's log chunk is most of the traffic. These build RunnerLog without
# the general machinery; tests/protocol/test_codec.py proves them equal to it.

_new = object.__new__
_PROCESS_PREFIX: Final = "RUNNER:process:"


def _runner_log(log: str, build: str | None, seq: int | None) -> RunnerLog:
    """A RunnerLog of checked values, built without the frozen ``__setattr__``:
    a plain instance of its slots class is filled and then becomes a RunnerLog
    (same layout: see ``messages._RunnerLogSlots``)."""
    message = _new(_RunnerLogSlots)
    message.log = log
    message.build = build
    message.seq = seq
    message.__class__ = RunnerLog
    return message  # type: ignore[return-value]


def fast_runner_log(value: dict[str, Any]) -> RunnerLog | None:
    """The RunnerLog of a parsed ``process`` payload, or None when the payload
    is not the plain, valid case (the general path then decides)."""
    log = value.get("log")
    if type(log) is not str or value.get("finished") is not False:
        return None
    if len(value) == 2:
        return _runner_log(log, None, None)
    build = value.get("build")
    seq = value.get("seq")
    if build is not None and (type(build) is not str or not build or "\0" in build):
        return None
    if seq is not None and (type(seq) is not int or not 1 <= seq <= MAX_INT):
        return None
    if len(value) != 2 + ("build" in value) + ("seq" in value):
        return None  # unknown keys: the general path ignores them
    return _runner_log(log, build, seq)


class _Chunk(msgspec.Struct, gc=False):
    """The shape of a ``process`` payload, as msgspec checks it while parsing.

    Unknown keys are skipped, as the general path ignores them; a key given
    twice counts with its last value, as in the general path.
    """

    finished: bool
    log: str
    build: str | None = None
    seq: int | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
#: What the chunk decoder raises for a payload that is not the plain case:
#: msgspec raises RecursionError past its depth limit, and UnicodeEncodeError
#: for a text holding a lone surrogate, not DecodeError.
_NOT_A_CHUNK: Final = (msgspec.DecodeError, RecursionError, UnicodeEncodeError)


def fast_log_frame(text: str) -> RunnerLog | None:
    """The RunnerLog of a whole ``RUNNER:process:`` frame in its plain,
    valid form, else None (then :func:`split_client` and
    :func:`parse_client` decide). For the hub's hot path."""
    if text[:15] != _PROCESS_PREFIX:
        return None
    return _fast_decode_log(text[15:])


def _fast_decode_log(payload: str) -> RunnerLog | None:
    """The RunnerLog of a ``process`` payload, or None when the payload is not
    the plain, valid case (the general path then decides).

    msgspec parses and checks the types in one pass, without building a
    dict: faster than ``orjson.loads`` alone (see docs/benchmarks.md).
    """
    try:
        chunk = _decode_chunk(payload)
    except _NOT_A_CHUNK:
        return None
    if chunk.finished:
        return None
    build = chunk.build
    seq = chunk.seq
    if build is not None and (not build or "\0" in build):
        return None
    if seq is not None and not 1 <= seq <= MAX_INT:
        return None
    return _runner_log(chunk.log, build, seq)


def _encode_runner_log(message: RunnerLog) -> str:
    fields: dict[str, Any] = {"finished": False, "log": message.log}
    if message.build is not None:
        fields["build"] = message.build
    if message.seq is not None:
        fields["seq"] = message.seq
    return _PROCESS_PREFIX + orjson.dumps(fields).decode()


# -- decoding ----------------------------------------------------------------------


def split_client(text: str) -> tuple[Role, str, str]:
    """Split a client frame into role, command and payload text.

    Raises :class:`MalformedFrame` or :class:`UnknownRole`; the payload is not
    looked at.
    """
    if text[:15] == _PROCESS_PREFIX:  # cheaper than startswith on 3.11
        return Role.RUNNER, "process", text[15:]
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise MalformedFrame("expected ROLE:command:payload")
    role, command, payload = parts
    if not _ROLE_RE.fullmatch(role):
        raise MalformedFrame("the role must be upper-case letters")
    if not _COMMAND_RE.fullmatch(command):
        raise MalformedFrame("the command must match [a-z_]+")
    found = _ROLES.get(role)
    if found is None:
        raise UnknownRole(f"unknown role {role!r}; expected RUNNER, API or WEB")
    return found, command, payload


def frame_head(text: str) -> str:
    """What may be logged of a frame: ``ROLE:command`` (a client frame) or
    ``command:`` (a server frame) and its length, never the payload (it may
    carry secrets). Never raises."""
    try:
        role, command, _ = split_client(text)
    except ProtocolError:
        command = text.split(":", 1)[0]
        if ":" in text and _COMMAND_RE.fullmatch(command):
            return f"{command}:, {len(text)} characters"
        return f"a malformed frame of {len(text)} characters"
    return f"{role.value}:{command}, {len(text)} characters"


def peek_req(payload: str) -> str | None:
    """The ``req`` of a payload, if it is a JSON object that has a string one."""
    if "req" not in payload:
        return None
    try:
        return _req_of(orjson.loads(payload))
    except orjson.JSONDecodeError:
        return None


def answer_unavailable(text: str, message: str) -> str | None:
    """What a server that cannot reach its shared state answers to a client frame.

    An API or WEB request gets an ``error`` frame with the code
    ``unavailable`` that echoes its ``req``: the client may retry it. A RUNNER
    frame gets None: it is part of a stream the hub must see whole and in
    order, so the server holds it until it can apply it, or closes the
    connection so that the runner resumes and sends it again.
    """
    try:
        role, _, payload = split_client(text)
    except ProtocolError:
        role, payload = None, ""
    if role is Role.RUNNER:
        return None
    return encode(Error(code=ErrorCode.UNAVAILABLE.value, message=message, req=peek_req(payload)))


def parse_client(role: Role, command: str, payload: str) -> ClientMessage:
    """Turn a split client frame into its message.

    Raises :class:`UnknownCommand`, :class:`Forbidden` or :class:`InvalidPayload`.
    """
    if command == "process" and role is Role.RUNNER:
        fast = _fast_decode_log(payload)
        if fast is not None:
            return fast
    return _parse_general(role, command, payload)


def _parse_general(role: Role, command: str, payload: str) -> ClientMessage:
    """``parse_client`` without the hot path: what the hot path must equal."""
    by_role = CLIENT_COMMANDS.get(command)
    if by_role is None:
        raise UnknownCommand(f"unknown command {command!r}", req=peek_req(payload))
    classes = by_role.get(role)
    if classes is None:
        raise Forbidden(
            f"{role}:{command} is not allowed; {command} is for " + ", ".join(sorted(by_role)),
            req=peek_req(payload),
        )
    value = _loads(payload, tolerant=role is Role.RUNNER)
    if not isinstance(value, dict):
        raise InvalidPayload("$: expected an object")
    if len(classes) == 2:  # process: finished picks the class
        finished = value.get("finished")
        if finished is None:
            raise InvalidPayload("$.finished: required field missing")
        if not isinstance(finished, bool):
            raise InvalidPayload("$.finished: expected a boolean")
        cls = classes[1] if finished else classes[0]
        return _structure(cls, {k: v for k, v in value.items() if k != "finished"})  # type: ignore[no-any-return]
    cls = classes[0]
    if cls in _ROLE_FIELD:
        return _structure(cls, value, role=role)  # type: ignore[no-any-return]
    return _structure(cls, value)  # type: ignore[no-any-return]


#: Messages that several roles share carry the role as a field.
_ROLE_FIELD: Final = frozenset(
    cls
    for by_role in CLIENT_COMMANDS.values()
    for classes in by_role.values()
    for cls in classes
    if "role" in attrs.fields_dict(cls)
)


def decode_client(text: str) -> ClientMessage:
    """Decode a client frame (``ROLE:command:payload``)."""
    return parse_client(*split_client(text))


def decode_server(text: str) -> ServerMessage:
    """Decode a server frame (``command:payload``)."""
    parts = text.split(":", 1)
    if len(parts) != 2 or not _COMMAND_RE.fullmatch(parts[0]):
        raise MalformedFrame("expected command:payload")
    command, payload = parts
    cls = SERVER_COMMANDS.get(command)
    if cls is None:
        raise UnknownCommand(f"unknown command {command!r}", req=peek_req(payload))
    value = _loads(payload, tolerant=False)
    if not isinstance(value, dict):
        raise InvalidPayload("$: expected an object")
    return _structure(cls, value)  # type: ignore[no-any-return]


def decode(text: str) -> Message:
    """Decode any frame: a leading upper-case role marks a client frame.

    Returns a message or raises :class:`ProtocolError`; nothing else.
    """
    if not isinstance(text, str):
        raise MalformedFrame("a frame is text")
    if text[:15] == _PROCESS_PREFIX:  # cheaper than startswith on 3.11
        fast = _fast_decode_log(text[15:])
        if fast is not None:
            return fast
    head = text.partition(":")[0]
    if _ROLE_RE.fullmatch(head):
        return decode_client(text)
    return decode_server(text)


# -- encoding ----------------------------------------------------------------------


def _payload(message: Message) -> str:
    cls = type(message)
    fields = _UNSTRUCTURE[cls](message)
    if cls is RunnerLog:
        fields = {"finished": False, **fields}
    elif cls is RunnerFinished:
        fields = {"finished": True, **fields}
    else:
        fields.pop("role", None)
        if not fields and message.COMMAND in _EMPTY_WHEN_BARE:
            return ""
    return orjson.dumps(fields).decode()


def encode_log_chunk(build: str, seq: int, log: str, time: str | None = None) -> str:
    """``encode(LogChunk(build=build, seq=seq, log=log, time=time))``, without
    building the message: the hub's hot path. The arguments must be valid."""
    if time is None:
        return "log:" + orjson.dumps({"build": build, "seq": seq, "log": log}).decode()
    return "log:" + orjson.dumps({"build": build, "seq": seq, "log": log, "time": time}).decode()


@functools.lru_cache(maxsize=8)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def log_time(t: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC with milliseconds, as every
    time of the wire: a chunk's ``time``. One call per chunk: the part up to
    the second is cached."""
    # As datetime.fromtimestamp does it: microseconds rounded half to even,
    # then cut to milliseconds (1.9 is 1.900, not 1.899...).
    fraction, whole = math.modf(t)
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    return f"{_second(second)}.{micros // 1000:03d}Z"


def as_data(value: Any) -> Any:
    """An object of the wire (``BuildInfo``, ``RunnerInfo``, a message) as
    the plain dicts and lists its JSON has."""
    return _converter.unstructure(value)


def encode(message: Message) -> str:
    """Encode a message as one text frame (strict, compact JSON)."""
    if type(message) is RunnerLog:
        return _encode_runner_log(message)
    try:
        if type(message) in SERVER_COMMANDS.values():
            return f"{message.COMMAND}:{_payload(message)}"
        role = message.role  # type: ignore[union-attr]
        return f"{role}:{message.COMMAND}:{_payload(message)}"
    except (KeyError, AttributeError):
        raise TypeError(f"not a citron message: {message!r}") from None
