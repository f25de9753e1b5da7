"""Hypothesis strategies for citron messages and frames (needs ``hypothesis``).

For fuzzing your own runner, front or server::

    from hypothesis import given
    from citron_protocol import strategies as cst

    @given(cst.frames(Role.RUNNER))
    def test_my_server_answers(frame): ...

- :func:`messages`, :func:`client_messages`, :func:`server_messages` and one
  strategy per message class (:data:`BY_CLASS`) give valid messages;
- :func:`frames` gives valid encoded frames, per role or for the server;
- :func:`legacy_log_frames` gives log frames as the legacy PHP runner escapes
  them (``addslashes``), which a tolerant decoder must accept;
- :func:`invalid_frames` gives frames that must be refused with a
  ``ProtocolError``: broken grammar, unknown roles and commands, bad payloads.
"""

from __future__ import annotations

from typing import Any

from ._extras import MissingExtra

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - without the fuzz extra
    raise MissingExtra(
        "citron_protocol.strategies needs the fuzz extra (hypothesis is not installed):"
        " pip install 'citron[fuzz]'"
    ) from None

from .codec import CLIENT_COMMANDS, encode
from .messages import (
    MAX_INT,
    Ack,
    BuildInfo,
    BuildReply,
    Builds,
    BuildState,
    Cancel,
    CancelBuild,
    ClientMessage,
    Error,
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
)

__all__ = [
    "BY_CLASS",
    "addslashes",
    "client_messages",
    "frames",
    "invalid_frames",
    "legacy_log_frames",
    "messages",
    "server_messages",
    "steps",
    "texts",
]


def texts(
    min_size: int = 0, max_size: int | None = None, nul: bool = True
) -> st.SearchStrategy[str]:
    """Any text a frame can carry (every code point but lone surrogates)."""
    exclude = "" if nul else "\0"
    return st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=exclude),
        min_size=min_size,
        max_size=max_size,
    )


_names = texts(min_size=1, max_size=20, nul=False)
_opt_names = st.none() | _names
_log = texts(max_size=200)
_counts = st.integers(min_value=0, max_value=MAX_INT)
_seqs = st.integers(min_value=1, max_value=MAX_INT)
_durations = st.integers(min_value=1, max_value=10**6) | st.floats(
    min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False
)
_script = st.lists(texts(max_size=40, nul=False), max_size=5).map(tuple)
_env_keys = _names.filter(lambda k: "=" not in k)
_env = st.none() | st.dictionaries(_env_keys, texts(max_size=20, nul=False), max_size=4)
_secrets = st.none() | st.dictionaries(
    _env_keys, texts(min_size=4, max_size=20, nul=False), max_size=3
)
_reqs = st.none() | texts(max_size=12)
_api_web = st.sampled_from([Role.API, Role.WEB])

_runner_infos = st.builds(
    RunnerInfo,
    id=_names,
    type=_names,
    name=st.none() | texts(max_size=20),
    state=st.sampled_from(RunnerState),
    build=_opt_names,
)
_step_seconds = st.none() | st.integers(0, 10**6) | st.floats(0, 1e6, allow_nan=False)
#: One script line's step, of every state, with what that state allows.
steps: st.SearchStrategy[Step] = st.one_of(
    st.builds(
        Step,
        state=st.just(StepState.PASSED),
        exit_code=st.none() | st.just(0),
        duration=_step_seconds,
    ),
    st.builds(
        Step,
        state=st.just(StepState.FAILED),
        exit_code=st.none()
        | st.integers(min_value=-(2**31), max_value=2**31 - 1).filter(lambda n: n != 0),
        duration=_step_seconds,
    ),
    st.builds(
        Step,
        state=st.just(StepState.CANCELLED),
        exit_code=st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
        duration=_step_seconds,
    ),
    st.builds(Step, state=st.just(StepState.SKIPPED)),
)
_steps = st.lists(steps, max_size=5).map(tuple)
_build_infos = st.builds(
    BuildInfo,
    id=_names,
    state=st.sampled_from(BuildState),
    repo=texts(max_size=40),
    script=_script,
    type=st.none() | texts(max_size=10),
    ref=st.none() | texts(max_size=10),
    runner=st.none() | texts(max_size=10),
    attempt=st.integers(min_value=1, max_value=MAX_INT),
    created=texts(max_size=30),
    started=st.none() | texts(max_size=30),
    finished=st.none() | texts(max_size=30),
    success=st.none() | st.booleans(),
    log_seq=_counts,
    log_bytes=_counts,
    truncated=st.booleans(),
    commit=st.none() | texts(max_size=40),
    exit_code=st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
    steps=st.none() | _steps,
)

#: One strategy of valid messages per message class.
BY_CLASS: dict[type[Any], st.SearchStrategy[Any]] = {
    RunnerInit: st.builds(
        RunnerInit,
        type=_names,
        name=st.none() | texts(max_size=20),
        protocol=_counts,
        resume=st.none() | st.builds(Resume, build=_names, session=_names),
    ),
    RunnerLog: st.builds(RunnerLog, log=_log, build=_opt_names, seq=st.none() | _seqs),
    RunnerFinished: st.builds(
        RunnerFinished,
        success=st.booleans(),
        build=_opt_names,
        leave=st.booleans(),
        commit=st.none() | st.from_regex(r"[0-9a-f]{40}", fullmatch=True),
        exit_code=st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
        steps=st.none() | _steps,
    ),
    RunnerUnregister: st.just(RunnerUnregister()),
    SubmitBuild: st.builds(
        SubmitBuild,
        repo=_names,
        script=_script,
        type=_opt_names,
        ref=_opt_names,
        env=_env,
        timeout=st.none() | _durations,
        secrets=_secrets,
        req=_reqs,
    ),
    CancelBuild: st.builds(CancelBuild, build=_names, req=_reqs),
    ShutdownRunner: st.builds(ShutdownRunner, runner=_names, req=_reqs),
    GetRunners: st.builds(GetRunners, role=_api_web, req=_reqs, after=_opt_names),
    GetBuilds: st.builds(
        GetBuilds,
        role=_api_web,
        state=st.none() | st.sampled_from(BuildState),
        limit=st.integers(min_value=1, max_value=GetBuilds.MAX_LIMIT),
        before=_opt_names,
        req=_reqs,
    ),
    GetBuild: st.builds(GetBuild, role=_api_web, build=_names, req=_reqs),
    Subscribe: st.builds(Subscribe, role=_api_web, build=_opt_names, from_=_counts, req=_reqs),
    Unsubscribe: st.builds(Unsubscribe, role=_api_web, build=_opt_names, req=_reqs),
    Ready: st.builds(
        Ready,
        runner=_names,
        protocol=_counts,
        session=_names,
        resume=st.none() | st.builds(ResumePoint, build=_names, seq=_counts),
    ),
    Run: st.builds(
        Run,
        build=_names,
        repo=_names,
        script=_script,
        ref=_opt_names,
        env=_env,
        timeout=st.none() | _durations,
        secrets=_secrets,
    ),
    Cancel: st.builds(Cancel, build=_names),
    Shutdown: st.just(Shutdown()),
    Ack: st.builds(Ack, build=_names, seq=st.none() | _counts, finished=st.booleans()),
    Queued: st.builds(Queued, build=_names, req=_reqs),
    BuildReply: st.builds(BuildReply, build=_build_infos, req=_reqs),
    Runners: st.builds(
        Runners,
        runners=st.lists(_runner_infos, max_size=3).map(tuple),
        req=_reqs,
        more=st.booleans(),
    ),
    Builds: st.builds(
        Builds,
        builds=st.lists(_build_infos, max_size=3).map(tuple),
        req=_reqs,
        more=st.booleans(),
    ),
    Subscribed: st.builds(Subscribed, build=_opt_names, from_=_counts, req=_reqs),
    Unsubscribed: st.builds(Unsubscribed, build=_opt_names, from_=_counts, req=_reqs),
    LogChunk: st.builds(LogChunk, build=_names, seq=_seqs, log=_log),
    StateChange: st.builds(StateChange, build=_build_infos),
    RunnerChange: st.builds(RunnerChange, runner=_runner_infos, gone=st.booleans()),
    Error: st.builds(Error, code=_names, message=texts(max_size=40), req=_reqs),
}

_CLIENT = [c for c in BY_CLASS if hasattr(c, "ROLES")]
_SERVER = [c for c in BY_CLASS if not hasattr(c, "ROLES")]


def client_messages(role: Role | None = None) -> st.SearchStrategy[ClientMessage]:
    """Valid client messages, of one role or all."""
    return st.one_of(*(BY_CLASS[c] for c in _CLIENT)).filter(
        lambda m: role is None or m.role is role
    )


def server_messages() -> st.SearchStrategy[ServerMessage]:
    """Valid server messages."""
    return st.one_of(*(BY_CLASS[c] for c in _SERVER))


def messages() -> st.SearchStrategy[Message]:
    """Every valid message."""
    return st.one_of(client_messages(), server_messages())


def frames(role: Role | None = None) -> st.SearchStrategy[str]:
    """Valid frames: client frames of ``role``, or server frames when None."""
    if role is None:
        return server_messages().map(encode)
    return client_messages(role).map(encode)


def addslashes(text: str) -> str:
    """PHP's ``addslashes``: backslash before ``'``, ``"`` and ``\\``; NUL as ``\\0``."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"').replace("\0", "\\0")


def legacy_log_frames() -> st.SearchStrategy[tuple[str, str]]:
    """``(frame, log)``: a log frame escaped as the legacy PHP runner does it,
    and the text it must decode to."""
    return texts(max_size=200).map(
        lambda log: (f'RUNNER:process:{{"finished": false, "log": "{addslashes(log)}"}}', log)
    )


_bad_payloads = st.sampled_from(
    [
        "{",
        "[]",
        "1",
        "null",
        '"text"',
        '{"req": 5}',
        '{"build": 1}',
        '{"script": "no list"}',
        '{"finished": "yes"}',
        '{"type": ""}',
        '{"limit": 0}',
        '{"from": -1}',
        '{"timeout": -5}',
        "{'single': 'quotes'}",
        '{"a": NaN}',
        '{"a": 1e999}',
        "\\",
    ]
)


def _mutate(frame: str, data: st.DataObject) -> str:
    if not frame:
        return frame
    i = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    op = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate", "duplicate"]))
    if op == "delete":
        return frame[:i] + frame[i + 1 :]
    if op == "truncate":
        return frame[:i]
    if op == "duplicate":
        return frame[:i] + frame[i:] + frame[i:]
    c = data.draw(st.sampled_from(list(":{}[]\",\\'0aZ\n\x00é")))
    return frame[:i] + c + frame[i + (op == "replace") :]


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    frame = draw(st.one_of(frames(Role.RUNNER), frames(Role.API), frames(Role.WEB), frames()))
    data = draw(st.data())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        frame = _mutate(frame, data)
    return frame


def invalid_frames() -> st.SearchStrategy[str]:
    """Frames a server must refuse with ``error:``: any text, mutated frames,
    wrong grammar, unknown roles and commands, payloads of the wrong shape.
    (A mutated frame is sometimes still valid; the decoder must then accept it.)"""
    known = sorted(CLIENT_COMMANDS)
    roles = st.sampled_from(["RUNNER", "API", "WEB"])
    return st.one_of(
        st.text(max_size=100),
        _mutated(),
        st.builds(
            lambda r, c: f"{r}:{c}:{{}}",
            st.from_regex(r"[A-Z]{1,8}", fullmatch=True),
            st.sampled_from(known),
        ),
        st.builds(
            lambda r, c: f"{r}:{c}:{{}}", roles, st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
        ),
        st.builds(lambda r, c, p: f"{r}:{c}:{p}", roles, st.sampled_from(known), _bad_payloads),
        st.builds(lambda r: f"{r}:", roles),
        st.builds(lambda r, c: f"{r}:{c}", roles, st.sampled_from(known)),
    )
