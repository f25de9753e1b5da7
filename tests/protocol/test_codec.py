"""The codec: seed frames, the round trip, totality, the legacy vectors."""

from __future__ import annotations

import base64
import copy
import json
import pickle
import re
import weakref
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citron_protocol import (
    ErrorCode,
    LogChunk,
    ProtocolError,
    Role,
    Run,
    SubmitBuild,
    decode,
    decode_client,
    decode_server,
    encode,
)
from citron_protocol import strategies as cst
from citron_protocol.codec import (
    CLIENT_COMMANDS,
    SERVER_COMMANDS,
    encode_log_chunk,
    frame_head,
    peek_req,
    repair_legacy_payload,
)
from citron_protocol.errors import (
    Forbidden,
    InvalidPayload,
    MalformedFrame,
    UnknownCommand,
    UnknownRole,
)
from citron_protocol.messages import MAX_INT, RunnerFinished, RunnerInit, RunnerLog

VECTORS = Path(__file__).parents[1] / "vectors" / "legacy-php-runner.jsonl"
SHARED_VECTORS = Path(__file__).parents[3] / "shared" / "vectors" / "legacy-php-runner.jsonl"


def load_vectors() -> list[dict[str, Any]]:
    return [json.loads(line) for line in VECTORS.read_text().splitlines() if line.strip()]


# -- the seed's exact frames ------------------------------------------------------


def test_seed_init_frame() -> None:
    assert decode('RUNNER:init:{"type": "simple"}') == RunnerInit(type="simple")


def test_seed_process_frames() -> None:
    assert decode('RUNNER:process:{"finished": false, "log": "..."}') == RunnerLog(log="...")
    assert decode('RUNNER:process:{"finished": true, "success": true}') == RunnerFinished(
        success=True
    )


def test_seed_run_frame() -> None:
    # The seed's run frame, with the build id the contract adds.
    message = decode('run:{"build": "b1", "repo": "...", "script": ["...", "..."]}')
    assert message == Run(build="b1", repo="...", script=("...", "..."))


def test_encoding_is_strict_compact_json() -> None:
    frame = encode(RunnerLog(log='a "b"\n\0', seq=1))
    assert frame == 'RUNNER:process:{"finished":false,"log":"a \\"b\\"\\n\\u0000","seq":1}'
    json.loads(frame.split(":", 2)[2])  # strict


def test_bare_commands_encode_without_payload() -> None:
    assert encode(decode("API:get_runners:")) == "API:get_runners:"
    assert encode(decode("RUNNER:unregister:")) == "RUNNER:unregister:"
    assert encode(decode("shutdown:")) == "shutdown:"
    assert decode("API:get_runners:{}") == decode("API:get_runners:")


def test_payload_keeps_its_colons() -> None:
    m = decode('RUNNER:process:{"finished": false, "log": "a:b:c"}')
    assert isinstance(m, RunnerLog) and m.log == "a:b:c"


def test_unknown_payload_keys_are_ignored() -> None:
    assert decode('RUNNER:init:{"type": "simple", "future": [1, 2]}') == RunnerInit(type="simple")


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "error", "code"),
    [
        ("", MalformedFrame, "malformed"),
        ("RUNNER", MalformedFrame, "malformed"),
        ("RUNNER:init", MalformedFrame, "malformed"),
        ("RUNNER:Init:{}", MalformedFrame, "malformed"),
        ("RUNNER:in-it:{}", MalformedFrame, "malformed"),
        ("runner-x:{}", MalformedFrame, "malformed"),
        ("FRONT:get_runners:", UnknownRole, "unknown_role"),
        ("API:launch:{}", UnknownCommand, "unknown_command"),
        ("bogus:{}", UnknownCommand, "unknown_command"),
        ('WEB:run:{"repo": "r", "script": []}', Forbidden, "forbidden"),
        ('WEB:cancel:{"build": "b"}', Forbidden, "forbidden"),
        ("RUNNER:get_builds:", Forbidden, "forbidden"),
        ("API:init:{}", Forbidden, "forbidden"),
        ("API:run:{", InvalidPayload, "invalid_payload"),
        ("API:run:[]", InvalidPayload, "invalid_payload"),
        ('API:run:{"repo": "r"}', InvalidPayload, "invalid_payload"),
        ('RUNNER:process:{"log": "x"}', InvalidPayload, "invalid_payload"),
        ("queued:{}", InvalidPayload, "invalid_payload"),
        ("queued:{", InvalidPayload, "invalid_payload"),
    ],
)
def test_bad_frames_raise_their_code(frame: str, error: type[ProtocolError], code: str) -> None:
    with pytest.raises(error) as info:
        decode(frame)
    assert info.value.code == code
    assert code in ErrorCode.__members__.values()
    assert info.value.message


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ('{"repo": "r", "script": ["a", 1]}', "$.script[1]: expected a string"),
        ('{"repo": "r", "script": "make"}', "$.script: expected a list of strings"),
        ('{"script": []}', "$.repo: required field missing"),
        ('{"repo": "", "script": []}', "$.repo: must not be empty"),
        ('{"repo": 5, "script": []}', "$.repo: expected a string"),
        ('{"repo": "r", "script": [], "timeout": 0}', "$.timeout: must be a positive number"),
        ('{"repo": "r", "script": [], "timeout": true}', "$.timeout: expected a number"),
        ('{"repo": "r", "script": [], "env": {"A": 1}}', "$.env.A: expected a string"),
        ('{"repo": "r", "script": [], "env": {"A=B": "1"}}', "$.env: invalid variable name"),
        ('{"repo": "r", "script": ["a\\u0000b"]}', "$.script[0]: must not contain a NUL"),
        ('{"repo": "r", "script": [], "req": 7}', "$.req: expected a string"),
    ],
)
def test_invalid_payloads_name_the_field(payload: str, problem: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        decode(f"API:run:{payload}")
    assert problem in info.value.message


def test_nested_errors_have_paths() -> None:
    with pytest.raises(InvalidPayload, match=r"\$\.resume\.session: required field missing"):
        decode('RUNNER:init:{"type": "s", "resume": {"build": "b"}}')
    with pytest.raises(InvalidPayload, match=r"\$\.runners\[1\]\.state: required field missing"):
        decode(
            'runners:{"runners": [{"id": "r", "type": "t", "state": "WAITING"},'
            ' {"id": "x", "type": "t"}]}'
        )
    with pytest.raises(InvalidPayload, match=r"\$\.limit: must be between 1 and 1000"):
        decode('WEB:get_builds:{"limit": 1001}')
    with pytest.raises(InvalidPayload, match=r"\$\.state: must be one of queued"):
        decode('WEB:get_builds:{"state": "done"}')


def test_errors_echo_req_when_they_can() -> None:
    with pytest.raises(InvalidPayload) as info:
        decode('API:run:{"req": "r-7", "repo": 3}')
    assert info.value.req == "r-7"
    with pytest.raises(UnknownCommand) as info2:
        decode('API:nope:{"req": "r-8"}')
    assert info2.value.req == "r-8"
    assert peek_req('{"req": 5}') is None
    assert peek_req("{broken req") is None


def test_no_coercion_of_types() -> None:
    with pytest.raises(InvalidPayload, match=r"\$\.seq: expected an integer"):
        decode('RUNNER:process:{"finished": false, "log": "x", "seq": "1"}')
    with pytest.raises(InvalidPayload, match=r"\$\.success: expected a boolean"):
        decode('RUNNER:process:{"finished": true, "success": 1}')
    with pytest.raises(InvalidPayload, match=r"\$\.seq: expected an integer"):
        decode('RUNNER:process:{"finished": false, "log": "x", "seq": 1.5}')
    with pytest.raises(InvalidPayload, match=r"\$\.seq: must be between"):
        decode('RUNNER:process:{"finished": false, "log": "x", "seq": 0}')


def test_constructing_an_invalid_message_fails() -> None:
    with pytest.raises(ValueError, match="script\\[0\\]: expected a string"):
        SubmitBuild(repo="r", script=(1,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a citron message"):
        encode("text")  # type: ignore[arg-type]


# -- properties ------------------------------------------------------------------------


@given(cst.messages())
def test_round_trip(message: Any) -> None:
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "cls", sorted(cst.BY_CLASS, key=lambda c: c.__name__), ids=lambda c: c.__name__
)
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_each_class(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(cst.BY_CLASS[cls])
    frame = encode(message)
    assert decode(frame) == message
    assert encode(decode(frame)) == frame


def test_strategies_cover_every_command() -> None:
    classes = {c for by_role in CLIENT_COMMANDS.values() for cs in by_role.values() for c in cs}
    assert classes | set(SERVER_COMMANDS.values()) == set(cst.BY_CLASS)


def _total(text: str) -> None:
    try:
        message = decode(text)
    except ProtocolError as exc:
        assert exc.code in ErrorCode.__members__.values()
        assert isinstance(exc.message, str) and exc.message
    else:
        assert decode(encode(message)) == message


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_decoder_is_total_over_any_text(text: str) -> None:
    _total(text)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(cst.invalid_frames())
def test_decoder_is_total_over_invalid_frames(text: str) -> None:
    _total(text)


@settings(max_examples=300)
@given(st.sampled_from(["RUNNER:process:", "API:run:", "WEB:subscribe:", "log:"]), st.text())
def test_decoder_is_total_over_any_payload(prefix: str, payload: str) -> None:
    _total(prefix + payload)


@given(cst.legacy_log_frames())
def test_legacy_escaped_frames_decode_to_their_text(case: tuple[str, str]) -> None:
    frame, log = case
    assert decode(frame) == RunnerLog(log=log)


@given(st.text(max_size=20), st.integers(min_value=1, max_value=2**53), cst.texts())
def test_log_chunk_fast_path_equals_encode(build: str, seq: int, log: str) -> None:
    if not build or "\0" in build:
        return
    assert encode_log_chunk(build, seq, log) == encode(LogChunk(build=build, seq=seq, log=log))
    stamp = "2026-12-03T17:10:51.123Z"
    assert encode_log_chunk(build, seq, log, stamp) == encode(
        LogChunk(build=build, seq=seq, log=log, time=stamp)
    )


@given(
    st.floats(min_value=0, max_value=2**34, allow_nan=False)
    | st.sampled_from([1.9, 0.9995, 1.0005, 1764780000.9999996, 1764780000.123])
)
def test_a_chunks_time_is_the_wires_time_format(t: float) -> None:
    from citron_protocol._state import rfc3339
    from citron_protocol.codec import log_time

    assert log_time(t) == rfc3339(t)


def test_repair_reads_pairs_left_to_right() -> None:
    assert repair_legacy_payload(r"it\'s") == "it's"
    assert repair_legacy_payload(r"a\0b") == r"a\u0000b"
    assert repair_legacy_payload(r"\\0") == r"\\0"  # escaped backslash, then 0
    assert repair_legacy_payload(r"\\\'") == r"\\'"
    assert repair_legacy_payload(r"\"") == r"\""


def test_tolerance_is_for_runners_only() -> None:
    with pytest.raises(InvalidPayload):
        decode_client('API:run:{"repo": "it\\\'s", "script": []}')
    with pytest.raises(InvalidPayload):
        decode_server('log:{"build": "b", "seq": 1, "log": "a\nb"}')


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(InvalidPayload):
        decode('RUNNER:process:{"finished": false, "log": "\\ud800\n"}')
    with pytest.raises(InvalidPayload):
        decode('RUNNER:process:{"finished": false, "log": "\ud800"}')


def test_non_json_constants_are_refused() -> None:
    with pytest.raises(InvalidPayload):
        decode('RUNNER:process:{"finished": false, "log": "x\n", "seq": NaN}')


# -- the legacy PHP runner's frames ---------------------------------------------------


def test_vector_copy_matches_shared() -> None:
    if not SHARED_VECTORS.exists():
        pytest.skip(
            "the check that tests/vectors/ is an exact copy of the PHP runner's frames"
            " needs the vectors' source, ../shared/vectors/ beside this clone (the copy"
            " in tests/vectors/ is tested anyway)"
        )
    assert VECTORS.read_bytes() == SHARED_VECTORS.read_bytes()


def test_vector_file_is_complete() -> None:
    vectors = load_vectors()
    assert len(vectors) == 23
    names = {v["name"] for v in vectors}
    assert {"init", "final_success", "final_failure", "nul_byte", "invalid_utf8"} <= names


@pytest.mark.parametrize("vector", load_vectors(), ids=lambda v: v["name"])
def test_legacy_vector(vector: dict[str, Any]) -> None:
    raw = base64.b64decode(vector["frame_b64"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Not a valid WebSocket text frame: a receiver closes with 1007 before
        # the codec sees it. Decoding the lossy text must still be total.
        assert vector["name"] in {"invalid_utf8", "utf8_split_multibyte"}
        _total(raw.decode("utf-8", "replace"))
        return
    message = decode(text)
    if vector["name"] == "init":
        assert message == RunnerInit(type="simple")
    elif vector["name"].startswith("final_"):
        assert message == RunnerFinished(success=vector["name"] == "final_success")
    else:
        buffer = base64.b64decode(vector["buffer_b64"]).decode("utf-8")
        assert message == RunnerLog(log=buffer)


def test_every_valid_utf8_vector_decodes() -> None:
    decoded = 0
    for vector in load_vectors():
        raw = base64.b64decode(vector["frame_b64"])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        decode(text)
        decoded += 1
    assert decoded == 21


def test_role_enum_matches_grammar() -> None:
    assert {r.value for r in Role} == {"RUNNER", "API", "WEB"}


# -- the hot path equals the general path ---------------------------------------------

from citron_protocol.codec import (  # noqa: E402
    _STRUCTURE,
    _fast_decode_log,
    _parse_general,
    fast_runner_log,
)

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=2**54),
    st.floats(allow_nan=False),
    cst.texts(max_size=5),
    st.just(""),
    st.just("\0"),
    st.lists(st.integers(), max_size=2),
)


@given(st.dictionaries(st.sampled_from(["finished", "log", "build", "seq", "extra"]), _values))
def test_fast_runner_log_agrees_with_the_general_path(payload: dict[str, Any]) -> None:
    fast = fast_runner_log(payload)
    if fast is None:
        return  # the general path decides
    general = _STRUCTURE[RunnerLog]({k: v for k, v in payload.items() if k != "finished"})
    assert fast == general
    assert (fast.log, fast.build, fast.seq) == (general.log, general.build, general.seq)


@given(cst.BY_CLASS[RunnerLog])
def test_log_frames_take_the_fast_path_both_ways(message: RunnerLog) -> None:
    frame = encode(message)
    payload = frame.split(":", 2)[2]
    assert fast_runner_log(json.loads(payload)) == message
    general = _STRUCTURE[RunnerLog](
        {k: v for k, v in json.loads(payload).items() if k != "finished"}
    )
    assert general == message
    assert frame == "RUNNER:process:" + json.dumps(
        {
            "finished": False,
            **{
                k: v
                for k, v in (("log", message.log), ("build", message.build), ("seq", message.seq))
                if v is not None
            },
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


@given(st.dictionaries(st.sampled_from(["finished", "log", "build", "seq", "extra"]), _values))
def test_decoding_a_process_frame_agrees_with_the_general_path(payload: dict[str, Any]) -> None:
    # decode() tries the hot path (msgspec) first: what it returns must be
    # what the general path builds, whatever the keys and their order.
    frame = "RUNNER:process:" + json.dumps(payload)
    try:
        message = decode(frame)
    except ProtocolError:
        return  # the general path raised: the hot path returned nothing
    if payload.get("finished") is not False:
        assert type(message) is not RunnerLog
        return
    general = _STRUCTURE[RunnerLog]({k: v for k, v in payload.items() if k != "finished"})
    assert type(message) is RunnerLog
    assert message == general
    assert (message.log, message.build, message.seq) == (general.log, general.build, general.seq)


def _outcome(decode_it: Any) -> tuple[str, Any]:
    try:
        message = decode_it()
    except ProtocolError as exc:
        return ("error", exc.code)
    return ("message", (type(message), message, attrs.astuple(message)))


_TOKENS = st.sampled_from(
    [
        "1e999",
        "-1e999",
        "-0",
        "01",
        "1.0",
        "true",
        "null",
        "NaN",
        '"\\ud800"',
        '"\\u0000"',
        "\\'",
        "\n",
        " ",
        ",",
        "}",
        '"finished":false',
        '"finished":true',
        '"log":"x"',
        '"build":"b"',
        '"seq":9007199254740993',
        '"seq":0',
        "[" * 1100 + "]" * 1100,
        "\ud800",  # a lone surrogate in the text itself
        '"\udfff"',
    ]
)


_NEAR: dict[str, st.SearchStrategy[Any]] = {
    "finished": st.sampled_from([False, True, 0, None]),
    "log": st.one_of(cst.texts(max_size=5), _values),
    "build": st.sampled_from([None, "b", "", "\0", "a\0b", 5, False]),
    "seq": st.sampled_from([None, 1, 0, -1, MAX_INT, MAX_INT + 1, True, 1.0]),
}


@st.composite
def _process_payloads(draw: st.DrawFn) -> str:
    """Payload texts near the hot path's case: each key present or not, with
    values on either side of what is valid, extra and repeated keys, and
    tokens spliced in anywhere."""
    if draw(st.booleans()):  # the plain case, build and seq on either side
        items = [("finished", False), ("log", draw(cst.texts(max_size=5)))]
        items += [(k, draw(_NEAR[k])) for k in ("build", "seq") if draw(st.booleans())]
    else:
        items = [(k, draw(v)) for k, v in _NEAR.items() if draw(st.integers(0, 3))]
    items += draw(st.lists(st.tuples(st.sampled_from([*_NEAR, "x"]), _values), max_size=2))
    items = draw(st.permutations(items))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_TOKENS) + text[at:]
    return text


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=500)
@given(_process_payloads())
def test_the_hot_path_agrees_with_the_general_path_over_payload_text(payload: str) -> None:
    # Whatever the hot path (msgspec) returns must be what the general path
    # (orjson, the legacy repair, cattrs) returns for the same payload.
    hot = _fast_decode_log(payload)
    general = _outcome(lambda: _parse_general(Role.RUNNER, "process", payload))
    if hot is not None:
        assert general == _outcome(lambda: hot)
    assert _outcome(lambda: decode("RUNNER:process:" + payload)) == general


@pytest.mark.parametrize(
    "payload",
    [
        '{"finished":false,"log":"a","log":"b"}',  # the last value counts
        '{"finished":false,"log":"a","x":1e999}',  # ignored, as the general path does
        '{"finished":false,"log":"a","x":' + "[" * 1010 + "]" * 1010 + "}",
        '{"finished":false,"log":"a","x":' + "[" * 5000 + "]" * 5000 + "}",
        '{"finished":false,"log":"\\ud800"}',
        '{"finished":false,"log":"a","seq":9007199254740993}',
        '{"finished":false,"log":"a","seq":true}',
        '{"finished":false,"log":"a","build":"a\\u0000b"}',
        ' {"finished":false,"log":"a"}\n',
        '{"finished":false,"log":"\ud800"}',
        '{"finished":false,"log":"a","x":"\udfff"}',
    ],
)
def test_the_hot_path_agrees_with_the_general_path_on_edge_payloads(payload: str) -> None:
    general = _outcome(lambda: _parse_general(Role.RUNNER, "process", payload))
    hot = _fast_decode_log(payload)
    if hot is not None:
        assert general == _outcome(lambda: hot)
    assert _outcome(lambda: decode("RUNNER:process:" + payload)) == general


@given(cst.BY_CLASS[RunnerLog], st.booleans())
def test_a_hot_path_runner_log_is_an_ordinary_one(message: RunnerLog, bare: bool) -> None:
    # The hot path builds RunnerLog through its slots class (see
    # messages._RunnerLogSlots); the result must behave as any RunnerLog.
    if bare:
        message = RunnerLog(log=message.log)
    made = decode(encode(message))
    assert type(made) is RunnerLog
    assert made == message and hash(made) == hash(message)
    assert pickle.loads(pickle.dumps(made)) == message
    assert copy.copy(made) == message and copy.deepcopy(made) == message
    assert attrs.asdict(made) == attrs.asdict(message)
    assert attrs.evolve(made, log="x") == attrs.evolve(message, log="x")
    assert weakref.ref(made)() is made
    assert repr(made) == repr(message)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.log = "changed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        made.other = 1  # type: ignore[attr-defined]
    assert not hasattr(made, "__dict__")


@pytest.mark.parametrize("depth", [10, 600, 990, 1100, 5000])
def test_a_legacy_frame_nested_deep_is_decoded_or_refused(depth: int) -> None:
    # The legacy repair parses with the json module; the check for lone
    # surrogates after it once recursed two frames per level, so a legacy
    # frame 600 levels deep raised RecursionError out of decode().
    frame = 'RUNNER:process:{"finished":false,"log":"it\\\'s","x":' + "[" * depth
    frame += "]" * depth + "}"
    try:
        message = decode(frame)
    except ProtocolError as exc:
        assert exc.code == "invalid_payload"
    else:
        assert message == RunnerLog(log="it's")


@given(st.text(max_size=300))
def test_frame_head_never_raises_nor_shows_the_payload(text: str) -> None:
    # Only the role, the command and the length: nothing else of the frame.
    assert re.fullmatch(
        rf"[A-Z]+:[a-z_]+, {len(text)} characters|[a-z_]+:, {len(text)} characters"
        rf"|a malformed frame of {len(text)} characters",
        frame_head(text),
    )


def test_frame_head_names_role_and_command() -> None:
    assert frame_head('API:run:{"secrets": {"A": "hunter22"}}') == "API:run, 38 characters"
    assert frame_head("junk") == "a malformed frame of 4 characters"
    # A server frame: its command, never its payload.
    assert frame_head('run:{"secrets": {"A": "hunter22"}}') == "run:, 34 characters"
    assert frame_head("Run:x") == "a malformed frame of 5 characters"


def test_the_example_frames_of_the_spec_decode() -> None:
    """Every whole frame in docs/protocol.md's ``text`` blocks decodes
    (lines with an ellipsis are abridged on purpose and skipped)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    frames = []
    for block in re.findall(r"```text\n(.*?)```", doc, re.S):
        for line in block.splitlines():
            frame = re.split(r"[→←] ", line, maxsplit=1)[-1].strip()
            if frame and "…" not in frame and not frame.startswith("("):  # (a comment)
                frames.append(frame)
    assert len(frames) >= 10
    for frame in frames:
        decode(frame)  # raises on a frame that breaks the contract


def test_null_is_the_default_of_an_optional_key_and_no_value_of_a_required_one() -> None:
    """docs/protocol.md §1.1: an optional key set to null is the key left out."""
    pairs = [
        ('RUNNER:init:{"type": "t", "protocol": null}', 'RUNNER:init:{"type": "t"}'),
        (
            'RUNNER:process:{"finished": true, "success": true, "leave": null}',
            'RUNNER:process:{"finished": true, "success": true}',
        ),
        ('API:get_builds:{"limit": null, "state": null}', "API:get_builds:{}"),
        ('WEB:subscribe:{"build": "b", "from": null}', 'WEB:subscribe:{"build": "b"}'),
        ('API:run:{"repo": "r", "script": [], "ref": null}', 'API:run:{"repo": "r", "script": []}'),
    ]
    for with_null, without in pairs:
        assert decode(with_null) == decode(without), with_null
    for bad in ('API:run:{"repo": null, "script": []}', 'API:run:{"repo": "r", "script": null}'):
        with pytest.raises(InvalidPayload):
            decode(bad)


def test_integers_are_written_as_integers() -> None:
    for number in ("2.0", "5e1", "1e999", "-1", "9007199254740993", "true"):
        with pytest.raises(InvalidPayload, match=r"\$\.protocol"):
            decode(f'RUNNER:init:{{"type": "t", "protocol": {number}}}')
    assert decode('RUNNER:init:{"type": "t", "protocol": 2}').protocol == 2  # type: ignore[union-attr]


def test_a_run_type_is_as_long_as_a_runner_type_at_most() -> None:
    fits = "é" * 128  # 256 bytes of UTF-8, 128 characters
    assert decode(f'API:run:{{"repo": "r", "script": [], "type": "{fits}"}}').type == fits  # type: ignore[union-attr]
    with pytest.raises(InvalidPayload, match="at most 256 bytes"):
        decode(f'API:run:{{"repo": "r", "script": [], "type": "{fits}x"}}')
