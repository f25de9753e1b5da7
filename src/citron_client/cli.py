"""``citron``: the command line of the backend and the front.

Exit codes:

====  ==========================================================
0     done (``submit --wait``, ``logs --follow``: the build succeeded)
1     ``submit --wait``, ``logs --follow``: the build failed
2     ``submit --wait``, ``logs --follow``: the build was cancelled or lost;
      or, before anything is sent, a feature whose extra is not installed
64    bad usage (a malformed or misplaced URL too)
65    the server answered ``error:`` (its code is printed)
69    the server cannot be reached
75    the connection dropped in the middle
77    the server refused the token
130   interrupted (Ctrl-C); a build being followed goes on
141   the output was closed early (``citron builds | head -1``): quiet
====  ==========================================================

The server is the ``--url``/``-u`` option, or the URL before the other
arguments, else ``$CITRON_URL``, else ``ws://127.0.0.1:8765/ws``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from citron_protocol import BuildInfo, BuildState, LogChunk, Role, RunnerInfo
from citron_protocol._extras import MissingExtra, need
from citron_protocol.codec import as_data
from citron_protocol.sections import SectionText

from .api import Client
from .connection import (
    DEFAULT_URL,
    AuthError,
    ConnectError,
    ConnectionLost,
    RequestError,
    TrustError,
    UrlError,
    choose_urls,
)
from .wire import Wire

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_MISSING_EXTRA = 2  # (before any build: a feature whose extra is not installed)
EXIT_USAGE = 64
EXIT_SERVER_ERROR = 65
EXIT_UNAVAILABLE = 69
EXIT_LOST = 75
EXIT_NOPERM = 77
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141
#: Seconds a waiting build may stay queued before ``--wait`` says why.
QUEUED_HINT_AFTER = 5.0


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _pairs(values: list[str] | None, what: str) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{what} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _url_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "url",
        nargs="?",
        help="the server's URL (or --url); several, comma-separated: tried in turn",
    )
    p.add_argument(
        "--url",
        "-u",
        dest="url_option",
        metavar="URL",
        help=f"the server: ws://HOST:PORT/ws or the dashboard's http://HOST:PORT/"
        f" (default $CITRON_URL, else {DEFAULT_URL})",
    )


def resolve_urls(args: argparse.Namespace) -> list[str]:
    """The server's URLs from the command line, ``$CITRON_URL`` or the
    default; a malformed or misplaced one is a UsageError."""
    build = getattr(args, "build", None)
    if isinstance(build, str) and "://" in build:
        raise UsageError(f"{build!r} is where the build id goes: give the URL first, or with --url")
    try:
        return choose_urls(getattr(args, "url", None), args.url_option, os.environ)
    except UrlError as exc:
        raise UsageError(str(exc)) from None


def _ca_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca",
        metavar="FILE",
        help="PEM file of a CA (or a self-signed certificate) to trust for wss:// URLs,"
        " besides the system's ($SSL_CERT_FILE)",
    )


def build_parser() -> _Parser:
    parser = _Parser(prog="citron", description="Submit, follow and inspect citron builds.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> _Parser:
        p: _Parser = sub.add_parser(name, help=help, description=help)
        _url_option(p)
        p.add_argument(
            "--token", default=os.environ.get("CITRON_TOKEN"), help="token (or CITRON_TOKEN)"
        )
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        _ca_option(p)
        return p

    def reader(name: str, help: str) -> _Parser:
        p = command(name, help)
        p.add_argument(
            "--role", choices=["api", "web"], default="api", help="role to read with (default api)"
        )
        return p

    p = command("submit", "queue a build; prints its id")
    p.add_argument("--repo", required=True)
    p.add_argument("--script", action="append", required=True, help="a script line (repeat)")
    p.add_argument("--type", help="only runners of this type may run it")
    p.add_argument("--ref", help="git ref to check out")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment (repeat)")
    p.add_argument(
        "--secret", action="append", metavar="NAME=VALUE", help="a secret, masked in logs (repeat)"
    )
    p.add_argument("--timeout", type=float, help="seconds")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the log; exit 0/1/2 on success/failure/cancelled or lost",
    )

    p = reader("runners", "list runners")
    p.add_argument(
        "--shutdown",
        metavar="RUNNER",
        help="tell this runner to leave (API role): it ends the build it runs, then goes",
    )
    p = reader("builds", "list builds, newest first")
    p.add_argument("--state", choices=[s.value for s in BuildState])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", help="only builds older than this one")
    p = reader("show", "show one build")
    p.add_argument("build")
    p = reader("logs", "print a build's log")
    p.add_argument("build")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="follow until the build ends; exit 0/1/2 on success/failure/cancelled or lost",
    )
    p = command("cancel", "cancel a build")
    p.add_argument("build")

    def tokens(p: _Parser) -> None:
        for role in ("runner", "api", "web"):
            p.add_argument(
                f"--{role}-token", help=f"token for {role.upper()} frames (default --token)"
            )

    p = command("fuzz", "send frames drawn from citron_protocol.strategies; check every answer")
    tokens(p)
    p.add_argument("--role", choices=["RUNNER", "API", "WEB", "ALL"], default="ALL", type=str.upper)
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--connections", type=int, default=1, help="connections per role")
    p.add_argument("--max-frame", type=int, default=1024 * 1024, help="the server's frame limit")
    p.add_argument(
        "--replay",
        metavar="FRAME|FILE",
        help="send this one frame (a JSON string) and check it; with --model, a file of"
        " frames, one ROLE:command:payload a line",
    )
    p.add_argument(
        "--model",
        action="store_true",
        help="compare every answer with citron_protocol's hub, the reference model (a fresh"
        " server with citron's default settings)",
    )

    p = sub.add_parser(
        "conformance",
        help="check a server (URL) or a runner (--runner -- COMMAND...) against docs/protocol.md",
    )
    _url_option(p)
    p.add_argument("--token", default=os.environ.get("CITRON_TOKEN"))
    tokens(p)
    _ca_option(p)
    p.add_argument("--runner", action="store_true", help="check the runner command given after --")
    p.add_argument("--lost-grace", type=float, default=60.0, help="the server's lost grace (s)")
    p.add_argument(
        "--cancel-timeout", type=float, default=30.0, help="the server's cancel timeout (s)"
    )
    p.add_argument("--max-wait", type=float, default=20.0, help="skip checks that wait longer (s)")
    p.add_argument(
        "--cancel-grace", type=float, default=10.0, help="runner: time to end a cancelled build (s)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="how long one expected frame may take (s; default 5 for a server, 10 for a runner)",
    )
    p.add_argument(
        "--check", action="append", default=[], metavar="NAME", help="run only this check (repeat)"
    )
    p.add_argument(
        "--model",
        type=int,
        default=0,
        metavar="N",
        help="server: compare N frames with the reference model first (a fresh server with"
        " citron's default settings)",
    )
    p.add_argument(
        "--protocol-only",
        action="store_true",
        help="runner: skip the checks that need script lines run as shell commands"
        " (for a runner whose lines are not shell; each skip says why)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("command_argv", nargs="*", help=argparse.SUPPRESS)
    return parser


# -- output -------------------------------------------------------------------------

_STEP_COLOURS = {
    "passed": "success",
    "failed": "failure",
    "cancelled": "cancelled",
    "skipped": "queued",
}
_COLOURS = {
    "success": "32",
    "failure": "31",
    "cancelled": "33",
    "lost": "35",
    "running": "36",
    "cancelling": "33",
    "queued": "2",
    "RUNNING": "36",
    "WAITING": "2",
}


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def paint(self, text: str, key: str) -> str:
        code = _COLOURS.get(key)
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def json(self, value: Any) -> None:
        print(json.dumps(as_data(value), indent=2))

    def table(
        self, headers: list[str], rows: list[list[str]], colour_column: int | None = None
    ) -> None:
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for row in rows:
            cells = []
            for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
                padded = cell.ljust(w)
                cells.append(self.paint(padded, cell) if i == colour_column else padded)
            print("  ".join(cells).rstrip())


def _duration(b: BuildInfo) -> str:
    from datetime import datetime

    if not b.started or not b.finished:
        return "-"
    start = datetime.fromisoformat(b.started.replace("Z", "+00:00"))
    end = datetime.fromisoformat(b.finished.replace("Z", "+00:00"))
    return f"{(end - start).total_seconds():.1f}s"


def _build_rows(builds: Sequence[BuildInfo]) -> list[list[str]]:
    return [
        [b.id, b.state.value, b.repo, b.runner or "-", b.started or "-", _duration(b)]
        for b in builds
    ]


def _show_build(out: Output, b: BuildInfo) -> None:
    if out.as_json:
        out.json(b)
        return
    facts = [
        ("id", b.id),
        ("state", out.paint(b.state.value, b.state.value)),
        ("repo", b.repo),
        ("ref", b.ref or "-"),
        ("commit", b.commit or "-"),
        ("type", b.type or "-"),
        ("runner", b.runner or "-"),
        ("attempt", str(b.attempt)),
        ("created", b.created),
        ("started", b.started or "-"),
        ("finished", b.finished or "-"),
        ("duration", _duration(b)),
        ("exit code", "-" if b.exit_code is None else str(b.exit_code)),
        (
            "log",
            f"{b.log_seq} chunks, {b.log_bytes} bytes" + (" (truncated)" if b.truncated else ""),
        ),
    ]
    for key, value in facts:
        print(f"{key + ':':11} {value}")
    if b.steps is None:
        print("script:")
        for line in b.script:
            print(f"  {line}")
        return
    print("steps:")
    for line, step in zip(b.script, b.steps, strict=False):
        first, _, rest = line.partition("\n")
        state = step.state.value
        seconds = "" if step.duration is None else f"{step.duration:.1f}s"
        code = ""
        if step.exit_code is not None and step.exit_code != 0:
            code = f"  (exit code {step.exit_code})"
        shown = out.paint(f"{state:9}", _STEP_COLOURS[state])
        print(f"  {shown} {seconds:>7}  $ {first}{' …' if rest else ''}{code}")


def _runner_rows(runners: Sequence[RunnerInfo]) -> list[list[str]]:
    return [[r.id, r.name or "-", r.type, r.state.value, r.build or "-"] for r in runners]


# -- commands -----------------------------------------------------------------------


async def _follow(client: Client, build: str, out: Output, *, hint: bool = False) -> BuildInfo:
    """Print the build's log until it ends; its last state. With ``hint``,
    say on stderr when it stays queued with no runner that could take it."""
    latest: list[BuildInfo] = []
    watcher = asyncio.create_task(_queued_hint(client, build, latest)) if hint else None
    text = SectionText()
    try:
        async for event in client.follow(build):
            if isinstance(event, LogChunk):
                if out.as_json:
                    print(
                        json.dumps({"seq": event.seq, "log": event.log, "time": event.time}),
                        flush=True,
                    )
                else:
                    sys.stdout.write(text.feed(event.log))
                    sys.stdout.flush()
            else:
                latest.append(event.build)
    finally:
        if watcher is not None:
            watcher.cancel()
    if not out.as_json:
        sys.stdout.write(text.flush())
        sys.stdout.flush()
    assert latest
    return latest[-1]


async def _queued_hint(client: Client, build: str, latest: list[BuildInfo]) -> None:
    await asyncio.sleep(QUEUED_HINT_AFTER)
    info = latest[-1] if latest else await client.build(build)
    if info.state is not BuildState.QUEUED:
        return
    why = why_queued(info, await client.runners())
    if why:
        print(f"citron: build {build} is still queued: {why}", file=sys.stderr, flush=True)


def why_queued(build: BuildInfo, runners: Sequence[RunnerInfo]) -> str | None:
    """Why no runner takes a queued build (None: one is about to)."""
    able = [r for r in runners if build.type is None or r.type == build.type]
    if not runners:
        return "no runner is connected (start one: citron-runner URL)"
    if not able:
        kinds = ", ".join(sorted({r.type for r in runners}))
        return (
            f"no connected runner has type {build.type!r} (connected types: {kinds});"
            f" start one with: citron-runner --type {build.type} URL"
        )
    if all(r.build is not None for r in able):
        return f"the {len(able)} runner(s) that can take it are busy; it waits its turn"
    return None


def _interrupted(build: str, urls: Sequence[str]) -> None:
    where = "" if list(urls) == [DEFAULT_URL] else f" -u {','.join(urls)}"
    print(
        f"\ncitron: stopped following; build {build} goes on on the server."
        f" To cancel it: citron cancel{where} {build}",
        file=sys.stderr,
        flush=True,
    )


def _exit_for(state: BuildState) -> int:
    if state is BuildState.SUCCESS:
        return 0
    if state is BuildState.FAILURE:
        return EXIT_FAILED
    return EXIT_CANCELLED


def _tokens(args: argparse.Namespace) -> dict[Role, str | None]:
    return {
        Role.RUNNER: args.runner_token or args.token,
        Role.API: args.api_token or args.token,
        Role.WEB: args.web_token or args.token,
    }


async def _reachable(url: str, token: str | None, ca: str | None) -> None:
    """Fail at once, with one line, when the server cannot be reached at all
    (rather than report every frame or check as failed)."""
    wire = await Wire.open(url, token, ca=ca)
    await wire.close()


async def _fuzz(args: argparse.Namespace) -> int:
    import random

    need("hypothesis", "fuzz", "citron fuzz")
    from .fuzz import Fuzzer

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    roles = list(Role) if args.role == "ALL" else [Role(args.role)]
    if args.model:
        return await _fuzz_model(args, seed)
    await _reachable(args.url, _tokens(args)[roles[0]], args.ca)
    fuzzer = Fuzzer(
        args.url,
        _tokens(args),
        roles=roles,
        frames=args.frames,
        seed=seed,
        connections=max(args.connections, 1),
        max_frame=args.max_frame,
        ca=args.ca,
    )
    if args.replay is not None:
        if len(roles) != 1:
            raise UsageError("--replay needs one --role")
        try:
            frame = json.loads(args.replay)
        except ValueError:
            frame = args.replay
        report = await fuzzer.replay(roles[0], str(frame))
    else:
        report = await fuzzer.run()
    if args.json:
        print(json.dumps(report.as_dict(args.url, seed), indent=2))
    else:
        report.print(args.url, seed, sys.stdout)
    return 1 if report.violations else 0


async def _fuzz_model(args: argparse.Namespace, seed: int) -> int:
    from .model import ModelFuzzer

    frames = None
    if args.replay is not None:
        frames = _frames_file(args.replay)
    await _reachable(args.url, _tokens(args)[Role.API], args.ca)
    fuzzer = ModelFuzzer(args.url, _tokens(args), frames=args.frames, seed=seed, ca=args.ca)
    report = await fuzzer.run(frames)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        report.print(sys.stdout)
    return 1 if report.differences else 0


def _frames_file(path: str) -> list[tuple[str, Role, str]]:
    """Frames to replay: one ``ROLE:command:payload`` a line; empty lines
    and lines that start with ``#`` are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--replay {path}: {exc}") from None
    frames = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        role = line.partition(":")[0]
        if role not in {r.value for r in Role}:
            raise UsageError(f"--replay {path}, line {n}: not ROLE:command:payload")
        frames.append(("replay", Role(role), line))
    return frames


async def _conformance(args: argparse.Namespace) -> int:
    from .conformance import RunnerConformance, ServerConformance, print_results

    if args.runner:
        if not args.command_argv:
            raise UsageError("conformance --runner needs the runner command after --")
        if shutil.which(args.command_argv[0]) is None:
            raise UsageError(f"cannot start the runner command: {args.command_argv[0]!r} not found")
        runner = RunnerConformance(
            args.command_argv,
            cancel_grace=args.cancel_grace,
            timeout=args.timeout or 10.0,
            only=args.check,
            protocol_only=args.protocol_only,
        )
        _known_checks(args.check, [name for name, _ in runner.checks])
        results = await runner.run()
        title = f"citron conformance --runner -- {' '.join(args.command_argv)}"
    else:
        if not args.url or args.command_argv:
            raise UsageError("conformance takes a server URL, or --runner -- COMMAND...")
        if args.protocol_only:
            raise UsageError("--protocol-only is for --runner: a server has no shell checks")
        if args.model < 0:
            raise UsageError(f"--model {args.model}: a number of frames, 0 or more")
        checker = ServerConformance(
            args.url,
            _tokens(args),
            lost_grace=args.lost_grace,
            cancel_timeout=args.cancel_timeout,
            max_wait=args.max_wait,
            timeout=args.timeout or 5.0,
            ca=args.ca,
            only=args.check,
            model=args.model,
        )
        _known_checks(args.check, [name for name, _ in checker.checks])
        await _reachable(args.url, _tokens(args)[Role.WEB], args.ca)
        results = await checker.run()
        title = f"citron conformance {args.url}"
    if args.json:
        print(
            json.dumps(
                [
                    {"check": r.name, "status": r.status, "detail": r.detail, "output": r.output}
                    for r in results
                ],
                indent=2,
            )
        )
    else:
        print_results(title, results)
    return 1 if any(r.status == "fail" for r in results) else 0


def _known_checks(asked: Sequence[str], names: Sequence[str]) -> None:
    unknown = [name for name in asked if name not in names]
    if unknown:
        raise UsageError(f"no check named {unknown[0]!r}; the checks: {', '.join(names)}")


async def _run(args: argparse.Namespace) -> int:
    if args.command == "conformance" and args.runner:
        if args.url or args.url_option:
            raise UsageError("conformance --runner plays the server itself: it takes no URL")
        return await _conformance(args)
    urls = resolve_urls(args)
    if args.command in ("fuzz", "conformance"):
        if len(urls) > 1:
            raise UsageError(f"{args.command} checks one server: give one URL")
        args.url = urls[0]
        return await (_fuzz(args) if args.command == "fuzz" else _conformance(args))
    out = Output(args.json)
    role = Role.WEB if getattr(args, "role", "api") == "web" else Role.API
    reconnect = args.command in ("logs", "submit")
    async with Client(urls, token=args.token, role=role, reconnect=reconnect, ca=args.ca) as client:
        if args.command == "submit":
            build = await client.submit(
                args.repo,
                args.script,
                type=args.type,
                ref=args.ref,
                env=_pairs(args.env, "--env"),
                secrets=_pairs(args.secret, "--secret"),
                timeout=args.timeout,
            )
            if args.json and not args.wait:
                out.json(await client.build(build))
            elif not args.wait:
                print(build)
            if not args.wait:
                return 0
            print(f"citron: build {build}", file=sys.stderr)
            try:
                final = await _follow(client, build, out, hint=True)
            except asyncio.CancelledError:
                _interrupted(build, urls)
                raise
            print(f"citron: build {build} {final.state.value}", file=sys.stderr)
            if out.as_json:
                print(json.dumps(as_data(final)), flush=True)
            return _exit_for(final.state)
        if args.command == "runners" and args.shutdown:
            told = await client.shutdown_runner(args.shutdown)
            if out.as_json:
                out.json(told)
            else:
                busy = f", after build {told.build}" if told.build else ""
                print(f"runner {told.id} ({told.name or told.type}) told to leave{busy}")
            return 0
        if args.command == "runners":
            runners = await client.runners()
            if out.as_json:
                out.json(list(runners))
            else:
                out.table(["id", "name", "type", "state", "build"], _runner_rows(runners), 3)
            return 0
        if args.command == "builds":
            builds = await client.builds(
                BuildState(args.state) if args.state else None, args.limit, args.before
            )
            if out.as_json:
                out.json(list(builds))
            else:
                out.table(
                    ["id", "state", "repo", "runner", "started", "duration"], _build_rows(builds), 1
                )
            return 0
        if args.command == "show":
            _show_build(out, await client.build(args.build))
            return 0
        if args.command == "cancel":
            _show_build(out, await client.cancel(args.build))
            return 0
        if args.command == "logs":
            if args.follow:
                try:
                    final = await _follow(client, args.build, out)
                except asyncio.CancelledError:
                    _interrupted(args.build, urls)
                    raise
                if out.as_json:
                    print(json.dumps(as_data(final)), flush=True)
                return _exit_for(final.state)
            info = await client.build(args.build)
            await _print_stored(client, info, out)
            return 0
    raise UsageError(f"unknown command {args.command}")


async def _print_stored(client: Client, info: BuildInfo, out: Output) -> None:
    """Print the log as stored now, without waiting for the build to end."""
    if info.log_seq == 0:
        return
    text = SectionText()
    async for event in client.follow(info.id):
        if isinstance(event, LogChunk):
            if out.as_json:
                print(json.dumps({"seq": event.seq, "log": event.log, "time": event.time}))
            else:
                sys.stdout.write(text.feed(event.log))
            if event.seq >= info.log_seq:
                break
    if not out.as_json:
        sys.stdout.write(text.flush())
    sys.stdout.flush()


def _fail(code: int, message: str) -> int:
    print(f"citron: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:  # conformance --runner -- COMMAND...
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    try:
        args = build_parser().parse_args(argv)
        if command:
            if args.command != "conformance":
                raise UsageError("only conformance --runner takes a command after --")
            args.command_argv = command
        return asyncio.run(_guarded(_run(args)))
    except UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``| head``): end quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


async def _guarded(work: Coroutine[Any, Any, int]) -> int:
    try:
        return await work
    except (UsageError, TrustError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except MissingExtra as exc:
        return _fail(EXIT_MISSING_EXTRA, str(exc))
    except AuthError as exc:
        return _fail(EXIT_NOPERM, str(exc))
    except ConnectError as exc:
        return _fail(EXIT_UNAVAILABLE, str(exc))
    except RequestError as exc:
        code = EXIT_NOPERM if exc.code == "unauthorized" else EXIT_SERVER_ERROR
        return _fail(code, f"the server refused: {exc.code}: {exc.message}")
    except ConnectionLost as exc:
        return _fail(EXIT_LOST, str(exc))
    except ValueError as exc:  # a message the protocol refuses (e.g. a short secret)
        return _fail(EXIT_USAGE, str(exc))
