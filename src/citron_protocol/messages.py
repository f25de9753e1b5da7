"""The typed messages of the citron wire protocol, one class per frame.

Messages are frozen values, validated when built: a message that exists can be
encoded. Each class names its command in ``COMMAND``; client messages name the
roles that may send them in ``ROLES``. The codec (:mod:`citron_protocol.codec`)
maps between these classes and frames.

Client frames (``ROLE:command:payload``):

=============================  ================  ==================
frame                          class             roles
=============================  ================  ==================
``init``                       RunnerInit        RUNNER
``process`` (finished false)   RunnerLog         RUNNER
``process`` (finished true)    RunnerFinished    RUNNER
``unregister``                 RunnerUnregister  RUNNER
``run``                        SubmitBuild       API
``cancel``                     CancelBuild       API
``shutdown_runner``            ShutdownRunner    API
``get_runners``                GetRunners        API, WEB
``get_builds``                 GetBuilds         API, WEB
``get_build``                  GetBuild          API, WEB
``subscribe``                  Subscribe         API, WEB
``unsubscribe``                Unsubscribe       API, WEB
=============================  ================  ==================

Server frames (``command:payload``): ``ready`` Ready, ``run`` Run, ``cancel``
Cancel, ``shutdown`` Shutdown, ``ack`` Ack, ``queued`` Queued, ``build`` BuildReply,
``runners`` Runners, ``builds`` Builds, ``subscribed`` Subscribed,
``unsubscribed`` Unsubscribed, ``log`` LogChunk, ``state`` StateChange,
``runner`` RunnerChange, ``error`` Error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Final

import attrs

__all__ = [
    "Ack",
    "MAX_INT",
    "MAX_NAME_BYTES",
    "MIN_SECRET",
    "BuildInfo",
    "BuildReply",
    "BuildState",
    "Builds",
    "Cancel",
    "CancelBuild",
    "ShutdownRunner",
    "ClientMessage",
    "Error",
    "FieldError",
    "GetBuild",
    "GetBuilds",
    "GetRunners",
    "LogChunk",
    "Message",
    "Queued",
    "Ready",
    "Resume",
    "ResumePoint",
    "Role",
    "Run",
    "RunnerChange",
    "RunnerFinished",
    "RunnerInfo",
    "RunnerInit",
    "RunnerLog",
    "RunnerState",
    "RunnerUnregister",
    "Runners",
    "ServerMessage",
    "Shutdown",
    "StateChange",
    "Step",
    "StepState",
    "SubmitBuild",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "utf8_size",
]

#: Largest integer a payload may carry (2**53, exact in every JSON parser).
MAX_INT = 2**53


class Role(StrEnum):
    """Who sends a client frame."""

    RUNNER = "RUNNER"
    API = "API"
    WEB = "WEB"


class BuildState(StrEnum):
    """States of a build (see the build table in :mod:`citron_protocol.states`)."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def finished(self) -> bool:
        """True for the states a build ends in."""
        return self in _FINAL


_FINAL = frozenset({BuildState.SUCCESS, BuildState.FAILURE, BuildState.CANCELLED, BuildState.LOST})


class RunnerState(StrEnum):
    """States of a registered runner."""

    WAITING = "WAITING"
    RUNNING = "RUNNING"


class StepState(StrEnum):
    """What became of one script line of a build (docs/protocol.md §5.7)."""

    PASSED = "passed"  # it ran and its status was 0
    FAILED = "failed"  # it ran and its status was not 0, or it was stopped by a timeout
    CANCELLED = "cancelled"  # it was running when the build was cancelled
    SKIPPED = "skipped"  # it did not run: a line before it ended the build


class FieldError(ValueError):
    """A field of a message has a value its type allows but the protocol not."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# -- validators ---------------------------------------------------------------


def _check_type(name: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise FieldError(name, f"expected {what}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _text(_: object, a: attrs.Attribute[Any], value: object) -> None:
    _check_type(a.name, value, str, "a string")


def _nonempty_text(_: object, a: attrs.Attribute[Any], value: object) -> None:
    _check_type(a.name, value, str, "a string")
    assert isinstance(value, str)
    if not value:
        raise FieldError(a.name, "must not be empty")
    if "\0" in value:
        raise FieldError(a.name, "must not contain a NUL character")


#: UTF-8 bytes at most of a runner's ``type`` and ``name`` (shown in every
#: listing and on the live feed of every front) and of a request's ``req``
#: (echoed in its reply).
MAX_NAME_BYTES: Final = 256


def utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8 bytes, as every limit of the protocol
    counts it (a lone surrogate counts 3)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _short(a: attrs.Attribute[Any], value: str) -> None:
    size = utf8_size(value)
    if size > MAX_NAME_BYTES:
        raise FieldError(a.name, f"must be at most {MAX_NAME_BYTES} bytes (UTF-8), got {size}")


def _short_nonempty_text(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    _nonempty_text(inst, a, value)
    assert isinstance(value, str)
    _short(a, value)


def _opt_short_text(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _text(inst, a, value)
        assert isinstance(value, str)
        _short(a, value)


def _opt_short_nonempty_text(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _short_nonempty_text(inst, a, value)


def _opt_nonempty_text(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _nonempty_text(inst, a, value)


def _opt_text(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _text(inst, a, value)


def _boolean(_: object, a: attrs.Attribute[Any], value: object) -> None:
    _check_type(a.name, value, bool, "a boolean")


def _opt_boolean(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _boolean(inst, a, value)


def _count(minimum: int) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: object) -> None:
        _check_type(a.name, value, int, "an integer")
        assert isinstance(value, int)
        if not minimum <= value <= MAX_INT:
            raise FieldError(a.name, f"must be between {minimum} and {MAX_INT}")

    return check


def _opt_count(minimum: int) -> Any:
    check = _count(minimum)

    def opt(inst: object, a: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            check(inst, a, value)

    return opt


def _opt_exit_code(_: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _check_type(a.name, value, int, "an integer")
    assert isinstance(value, int)
    if not -(2**31) <= value < 2**31:
        raise FieldError(a.name, "must be a 32-bit integer")


def _opt_duration(_: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _check_type(a.name, value, (int, float), "a number")
    assert isinstance(value, (int, float))
    if not (math.isfinite(value) and 0 < value <= MAX_INT):
        raise FieldError(a.name, "must be a positive number of seconds")


def _script(_: object, a: attrs.Attribute[Any], value: object) -> None:
    _check_type(a.name, value, tuple, "a list of strings")
    assert isinstance(value, tuple)
    for i, line in enumerate(value):
        if not isinstance(line, str):
            raise FieldError(f"{a.name}[{i}]", "expected a string")
        if "\0" in line:
            raise FieldError(f"{a.name}[{i}]", "must not contain a NUL character")


def _opt_seconds(_: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _check_type(a.name, value, (int, float), "a number")
    assert isinstance(value, (int, float))
    if not (math.isfinite(value) and 0 <= value <= MAX_INT):
        raise FieldError(a.name, "must be a number of seconds, 0 or more")


def _to_seconds(value: object) -> object:
    """An integer number of seconds as a float (``1`` is ``1.0``: one value,
    one encoding); anything else as it is, for the validator."""
    if type(value) is int and abs(value) <= MAX_INT:
        return float(value)
    return value


def _step_exit_code(inst: Any, a: attrs.Attribute[Any], value: object) -> None:
    _opt_exit_code(inst, a, value)
    state = inst.state
    if state is StepState.SKIPPED and value is not None:
        raise FieldError(a.name, "a skipped line has no exit code")
    if state is StepState.PASSED and value not in (0, None):
        raise FieldError(a.name, "a passed line exited 0")
    if state is StepState.FAILED and value == 0:
        raise FieldError(a.name, "a failed line did not exit 0")


def _steps(_: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _check_type(a.name, value, tuple, "a list of steps")
    assert isinstance(value, tuple)
    for i, step in enumerate(value):
        if not isinstance(step, Step):
            raise FieldError(f"{a.name}[{i}]", "expected a step object")


def _opt_env(_: object, a: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    _check_type(a.name, value, dict, "an object of strings")
    assert isinstance(value, dict)
    for k, v in value.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise FieldError(f"{a.name}", f"invalid variable name {k!r}")
        if not isinstance(v, str):
            raise FieldError(f"{a.name}.{k}", "expected a string")
        if "\0" in v:
            raise FieldError(f"{a.name}.{k}", "must not contain a NUL character")


#: The shortest secret value a build may carry: shorter ones would mask common text.
MIN_SECRET = 4


def _opt_secrets(inst: object, a: attrs.Attribute[Any], value: object) -> None:
    _opt_env(inst, a, value)
    if value is not None:
        assert isinstance(value, dict)
        for name, secret in value.items():
            if len(secret) < MIN_SECRET:
                raise FieldError(
                    f"{a.name}.{name}", f"a secret must be at least {MIN_SECRET} characters"
                )


def _role(allowed: frozenset[Role]) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: object) -> None:
        if value not in allowed:
            raise FieldError(a.name, f"must be one of {', '.join(sorted(allowed))}")

    return check


def _enum(kind: type[StrEnum]) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, kind):
            raise FieldError(a.name, f"must be one of {', '.join(m.value for m in kind)}")

    return check


def _opt_enum(kind: type[StrEnum]) -> Any:
    check = _enum(kind)

    def opt(inst: object, a: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            check(inst, a, value)

    return opt


def _instance(kind: type) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, kind):
            raise FieldError(a.name, f"expected {kind.__name__}")

    return check


def _opt_instance(kind: type) -> Any:
    check = _instance(kind)

    def opt(inst: object, a: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            check(inst, a, value)

    return opt


def _tuple_of(kind: type) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: object) -> None:
        _check_type(a.name, value, tuple, "a list")
        assert isinstance(value, tuple)
        for i, item in enumerate(value):
            if not isinstance(item, kind):
                raise FieldError(f"{a.name}[{i}]", f"expected {kind.__name__}")

    return check


def _to_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _to_dict(value: object) -> object:
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


_API = frozenset({Role.API})
_API_WEB = frozenset({Role.API, Role.WEB})
_RUNNER = frozenset({Role.RUNNER})
_REQ = attrs.field(default=None, validator=_opt_short_text)

# -- shared objects -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Resume:
    """What a runner shows to take back a build after a reconnect."""

    build: str = attrs.field(validator=_nonempty_text)
    session: str = attrs.field(validator=_nonempty_text)


@attrs.frozen(kw_only=True)
class ResumePoint:
    """The server's answer to an accepted resume: the last runner seq stored."""

    build: str = attrs.field(validator=_nonempty_text)
    seq: int = attrs.field(validator=_count(0))


@attrs.frozen(kw_only=True)
class Step:
    """One script line of a build as its runner reports it: ``state``, the
    line's exit status (``exit_code``: None when it did not exit on its own
    or did not run) and how long it ran (``duration``, seconds; None when it
    did not run). A build's ``steps`` has one per script line, in order."""

    state: StepState = attrs.field(validator=_enum(StepState))
    exit_code: int | None = attrs.field(default=None, validator=_step_exit_code)
    duration: float | None = attrs.field(
        default=None, converter=_to_seconds, validator=_opt_seconds
    )


@attrs.frozen(kw_only=True)
class RunnerInfo:
    """A runner as ``get_runners`` and ``runner:`` show it."""

    id: str = attrs.field(validator=_nonempty_text)
    type: str = attrs.field(validator=_nonempty_text)
    name: str | None = attrs.field(default=None, validator=_opt_text)
    state: RunnerState = attrs.field(validator=_enum(RunnerState))
    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)


@attrs.frozen(kw_only=True)
class BuildInfo:
    """A build as ``build:``, ``builds:`` and ``state:`` show it.

    Times are RFC 3339 UTC strings; absent values are null on the wire.
    """

    id: str = attrs.field(validator=_nonempty_text)
    state: BuildState = attrs.field(validator=_enum(BuildState))
    repo: str = attrs.field(validator=_text)
    script: tuple[str, ...] = attrs.field(converter=_to_tuple, validator=_script)
    type: str | None = attrs.field(default=None, validator=_opt_text)
    ref: str | None = attrs.field(default=None, validator=_opt_text)
    runner: str | None = attrs.field(default=None, validator=_opt_text)
    attempt: int = attrs.field(default=1, validator=_count(1))
    created: str = attrs.field(validator=_text)
    started: str | None = attrs.field(default=None, validator=_opt_text)
    finished: str | None = attrs.field(default=None, validator=_opt_text)
    success: bool | None = attrs.field(default=None, validator=_opt_boolean)
    log_seq: int = attrs.field(default=0, validator=_count(0))
    log_bytes: int = attrs.field(default=0, validator=_count(0))
    truncated: bool = attrs.field(default=False, validator=_boolean)
    commit: str | None = attrs.field(default=None, validator=_opt_short_text)
    exit_code: int | None = attrs.field(default=None, validator=_opt_exit_code)
    steps: tuple[Step, ...] | None = attrs.field(
        default=None, converter=_to_tuple, validator=_steps
    )


# -- client messages: RUNNER ------------------------------------------------------


@attrs.frozen(kw_only=True)
class RunnerInit:
    """``RUNNER:init``: register, optionally taking back a build (``resume``)."""

    COMMAND: ClassVar[str] = "init"
    ROLES: ClassVar[frozenset[Role]] = _RUNNER

    type: str = attrs.field(validator=_short_nonempty_text)
    name: str | None = attrs.field(default=None, validator=_opt_short_text)
    protocol: int = attrs.field(default=0, validator=_count(0))
    resume: Resume | None = attrs.field(default=None, validator=_opt_instance(Resume))

    @property
    def role(self) -> Role:
        return Role.RUNNER


class _RunnerLogSlots:
    """The storage of :class:`RunnerLog`, and nothing else.

    RunnerLog adds no slot of its own (attrs reuses these), so an instance of
    this plain class can become a RunnerLog by ``__class__`` assignment. The
    codec's hot path fills one with ordinary slot stores and then does that,
    which costs half of what filling a frozen instance costs; the checks that
    RunnerLog's validators make are made first (see ``codec._fast_decode_log``).
    """

    __slots__ = ("__weakref__", "build", "log", "seq")
    log: str
    build: str | None
    seq: int | None


@attrs.frozen(kw_only=True)
class RunnerLog(_RunnerLogSlots):
    """``RUNNER:process`` with ``finished: false``: a chunk of build output."""

    COMMAND: ClassVar[str] = "process"
    ROLES: ClassVar[frozenset[Role]] = _RUNNER

    log: str = attrs.field(validator=_text)
    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    seq: int | None = attrs.field(default=None, validator=_opt_count(1))

    @property
    def role(self) -> Role:
        return Role.RUNNER


@attrs.frozen(kw_only=True)
class RunnerFinished:
    """``RUNNER:process`` with ``finished: true``: the current build ended.
    With ``leave``, the runner also leaves: it is given no other build.
    ``commit`` is what was built (a git commit's full id), ``exit_code`` the
    exit status of the line that failed (0 on success), ``steps`` what became
    of each script line (one :class:`Step` per line, in order); each may be
    unknown (None)."""

    COMMAND: ClassVar[str] = "process"
    ROLES: ClassVar[frozenset[Role]] = _RUNNER

    success: bool = attrs.field(validator=_boolean)
    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    leave: bool = attrs.field(default=False, validator=_boolean)
    commit: str | None = attrs.field(default=None, validator=_opt_short_text)
    exit_code: int | None = attrs.field(default=None, validator=_opt_exit_code)
    steps: tuple[Step, ...] | None = attrs.field(
        default=None, converter=_to_tuple, validator=_steps
    )

    @property
    def role(self) -> Role:
        return Role.RUNNER


@attrs.frozen(kw_only=True)
class RunnerUnregister:
    """``RUNNER:unregister``: the runner leaves."""

    COMMAND: ClassVar[str] = "unregister"
    ROLES: ClassVar[frozenset[Role]] = _RUNNER

    @property
    def role(self) -> Role:
        return Role.RUNNER


# -- client messages: API and WEB ---------------------------------------------------


@attrs.frozen(kw_only=True)
class SubmitBuild:
    """``API:run``: queue a build. Answered by ``queued:``."""

    COMMAND: ClassVar[str] = "run"
    ROLES: ClassVar[frozenset[Role]] = _API

    repo: str = attrs.field(validator=_nonempty_text)
    script: tuple[str, ...] = attrs.field(converter=_to_tuple, validator=_script)
    type: str | None = attrs.field(default=None, validator=_opt_short_nonempty_text)
    ref: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    env: dict[str, str] | None = attrs.field(default=None, converter=_to_dict, validator=_opt_env)
    timeout: float | None = attrs.field(default=None, validator=_opt_duration)
    secrets: dict[str, str] | None = attrs.field(
        default=None, converter=_to_dict, validator=_opt_secrets, repr=False
    )
    req: str | None = _REQ

    @property
    def role(self) -> Role:
        return Role.API


@attrs.frozen(kw_only=True)
class CancelBuild:
    """``API:cancel``: cancel a build. Answered by ``build:``."""

    COMMAND: ClassVar[str] = "cancel"
    ROLES: ClassVar[frozenset[Role]] = _API

    build: str = attrs.field(validator=_nonempty_text)
    req: str | None = _REQ

    @property
    def role(self) -> Role:
        return Role.API


@attrs.frozen(kw_only=True)
class ShutdownRunner:
    """``API:shutdown_runner``: tell a runner to leave (the server sends it
    ``shutdown:``). Answered by ``runners:`` with that runner as it was."""

    COMMAND: ClassVar[str] = "shutdown_runner"
    ROLES: ClassVar[frozenset[Role]] = _API

    runner: str = attrs.field(validator=_nonempty_text)
    req: str | None = _REQ

    @property
    def role(self) -> Role:
        return Role.API


@attrs.frozen(kw_only=True)
class GetRunners:
    """``get_runners``: list the registered runners. Answered by ``runners:``.
    ``after``: only runners whose id sorts after it (the next page of a
    reply that said ``more``)."""

    COMMAND: ClassVar[str] = "get_runners"
    ROLES: ClassVar[frozenset[Role]] = _API_WEB

    role: Role = attrs.field(validator=_role(_API_WEB))
    req: str | None = _REQ
    after: str | None = attrs.field(default=None, validator=_opt_nonempty_text)


@attrs.frozen(kw_only=True)
class GetBuilds:
    """``get_builds``: list builds, newest first. Answered by ``builds:``."""

    COMMAND: ClassVar[str] = "get_builds"
    ROLES: ClassVar[frozenset[Role]] = _API_WEB
    MAX_LIMIT: ClassVar[int] = 1000

    role: Role = attrs.field(validator=_role(_API_WEB))
    state: BuildState | None = attrs.field(default=None, validator=_opt_enum(BuildState))
    limit: int = attrs.field(default=50)
    before: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    req: str | None = _REQ

    @limit.validator
    def _check_limit(self, a: attrs.Attribute[Any], value: object) -> None:
        _check_type(a.name, value, int, "an integer")
        assert isinstance(value, int)
        if not 1 <= value <= self.MAX_LIMIT:
            raise FieldError(a.name, f"must be between 1 and {self.MAX_LIMIT}")


@attrs.frozen(kw_only=True)
class GetBuild:
    """``get_build``: one build. Answered by ``build:``."""

    COMMAND: ClassVar[str] = "get_build"
    ROLES: ClassVar[frozenset[Role]] = _API_WEB

    role: Role = attrs.field(validator=_role(_API_WEB))
    build: str = attrs.field(validator=_nonempty_text)
    req: str | None = _REQ


@attrs.frozen(kw_only=True)
class Subscribe:
    """``subscribe``: follow one build's log from ``from_`` (wire key ``from``),
    or, with no build, the live feed of every build and runner change."""

    COMMAND: ClassVar[str] = "subscribe"
    ROLES: ClassVar[frozenset[Role]] = _API_WEB

    role: Role = attrs.field(validator=_role(_API_WEB))
    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    from_: int = attrs.field(default=0, validator=_count(0))
    req: str | None = _REQ


@attrs.frozen(kw_only=True)
class Unsubscribe:
    """``unsubscribe``: stop following one build, or the live feed."""

    COMMAND: ClassVar[str] = "unsubscribe"
    ROLES: ClassVar[frozenset[Role]] = _API_WEB

    role: Role = attrs.field(validator=_role(_API_WEB))
    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    req: str | None = _REQ


# -- server messages -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Ready:
    """``ready``: a runner is registered (with ``resume`` when it took a build back)."""

    COMMAND: ClassVar[str] = "ready"

    runner: str = attrs.field(validator=_nonempty_text)
    protocol: int = attrs.field(validator=_count(0))
    session: str = attrs.field(validator=_nonempty_text)
    resume: ResumePoint | None = attrs.field(default=None, validator=_opt_instance(ResumePoint))


@attrs.frozen(kw_only=True)
class Run:
    """``run``: the server gives a runner a build to run. ``build`` is None
    from a seed-only server, which names no build (docs/protocol.md §2.1)."""

    COMMAND: ClassVar[str] = "run"

    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    repo: str = attrs.field(validator=_nonempty_text)
    script: tuple[str, ...] = attrs.field(converter=_to_tuple, validator=_script)
    ref: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    env: dict[str, str] | None = attrs.field(default=None, converter=_to_dict, validator=_opt_env)
    timeout: float | None = attrs.field(default=None, validator=_opt_duration)
    secrets: dict[str, str] | None = attrs.field(
        default=None, converter=_to_dict, validator=_opt_secrets, repr=False
    )


@attrs.frozen(kw_only=True)
class Cancel:
    """``cancel``: the runner must stop the build and finish it unsuccessfully
    (``build`` None: the current build, as a seed-only server says it)."""

    COMMAND: ClassVar[str] = "cancel"

    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)


@attrs.frozen(kw_only=True)
class Shutdown:
    """``shutdown``: the runner leaves and does not come back."""

    COMMAND: ClassVar[str] = "shutdown"


@attrs.frozen(kw_only=True)
class Ack:
    """``ack`` (protocol 2): the runner's chunks of ``build`` up to ``seq``
    are durable in the server's store, or (``finished``) its result is; the
    runner may forget them."""

    COMMAND: ClassVar[str] = "ack"

    build: str = attrs.field(validator=_nonempty_text)
    seq: int | None = attrs.field(default=None, validator=_opt_count(0))
    finished: bool = attrs.field(default=False, validator=_boolean)


@attrs.frozen(kw_only=True)
class Queued:
    """``queued``: reply to ``API:run``."""

    COMMAND: ClassVar[str] = "queued"

    build: str = attrs.field(validator=_nonempty_text)
    req: str | None = _REQ


@attrs.frozen(kw_only=True)
class BuildReply:
    """``build``: reply to ``get_build`` and ``cancel``; the payload is the build
    object with ``req`` added."""

    COMMAND: ClassVar[str] = "build"

    build: BuildInfo = attrs.field(validator=_instance(BuildInfo))
    req: str | None = _REQ


@attrs.frozen(kw_only=True)
class Runners:
    """``runners``: reply to ``get_runners``. ``more``: the reply was cut
    to stay within the server's reply size; it then lists runners in id
    order, and ``get_runners`` with ``after`` set to the last id gives the
    next page."""

    COMMAND: ClassVar[str] = "runners"

    runners: tuple[RunnerInfo, ...] = attrs.field(
        converter=_to_tuple, validator=_tuple_of(RunnerInfo)
    )
    req: str | None = _REQ
    more: bool = attrs.field(default=False, validator=_boolean)


@attrs.frozen(kw_only=True)
class Builds:
    """``builds``: reply to ``get_builds``, newest first. ``more``: the
    reply was cut short of ``limit`` to stay within the server's reply size;
    ask again with ``before`` set to the last build's id for the rest."""

    COMMAND: ClassVar[str] = "builds"

    builds: tuple[BuildInfo, ...] = attrs.field(converter=_to_tuple, validator=_tuple_of(BuildInfo))
    req: str | None = _REQ
    more: bool = attrs.field(default=False, validator=_boolean)


@attrs.frozen(kw_only=True)
class Subscribed:
    """``subscribed``: reply to ``subscribe`` (``build`` null for the live feed)."""

    COMMAND: ClassVar[str] = "subscribed"

    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    from_: int = attrs.field(default=0, validator=_count(0))
    req: str | None = _REQ


@attrs.frozen(kw_only=True)
class Unsubscribed:
    """``unsubscribed``: reply to ``unsubscribe``; ``from_`` is the last seq sent."""

    COMMAND: ClassVar[str] = "unsubscribed"

    build: str | None = attrs.field(default=None, validator=_opt_nonempty_text)
    from_: int = attrs.field(default=0, validator=_count(0))
    req: str | None = _REQ


@attrs.frozen(kw_only=True)
class LogChunk:
    """``log``: one stored chunk of a build's log, numbered by ``seq`` from 1;
    ``time`` is when the server received it (RFC 3339; None for chunks
    stored before servers kept it)."""

    COMMAND: ClassVar[str] = "log"

    build: str = attrs.field(validator=_nonempty_text)
    seq: int = attrs.field(validator=_count(1))
    log: str = attrs.field(validator=_text)
    time: str | None = attrs.field(default=None, validator=_opt_text)


@attrs.frozen(kw_only=True)
class StateChange:
    """``state``: a build changed; the payload is the build object."""

    COMMAND: ClassVar[str] = "state"

    build: BuildInfo = attrs.field(validator=_instance(BuildInfo))


@attrs.frozen(kw_only=True)
class RunnerChange:
    """``runner``: a runner registered, changed state or left (``gone``)."""

    COMMAND: ClassVar[str] = "runner"

    runner: RunnerInfo = attrs.field(validator=_instance(RunnerInfo))
    gone: bool = attrs.field(default=False, validator=_boolean)


@attrs.frozen(kw_only=True)
class Error:
    """``error``: the answer to a bad frame. ``code`` is an :class:`ErrorCode`
    value (kept as a string so that newer codes still decode)."""

    COMMAND: ClassVar[str] = "error"

    code: str = attrs.field(validator=_nonempty_text)
    message: str = attrs.field(validator=_text)
    req: str | None = _REQ


ClientMessage = (
    RunnerInit
    | RunnerLog
    | RunnerFinished
    | RunnerUnregister
    | SubmitBuild
    | CancelBuild
    | ShutdownRunner
    | GetRunners
    | GetBuilds
    | GetBuild
    | Subscribe
    | Unsubscribe
)

ServerMessage = (
    Ready
    | Run
    | Cancel
    | Shutdown
    | Ack
    | Queued
    | BuildReply
    | Runners
    | Builds
    | Subscribed
    | Unsubscribed
    | LogChunk
    | StateChange
    | RunnerChange
    | Error
)

Message = ClientMessage | ServerMessage
