"""``citron-runner``: the simple runner on the command line.

Exit codes: 0 stopped normally, 2 bad usage, 69 the server cannot be reached,
77 the server refused the token.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from .connection import DEFAULT_URL, AuthError, ConnectError, TrustError, UrlError, choose_urls
from .runner import RunnerHost
from .simple import SimpleRunner

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_NOPERM = 77


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"citron-runner: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> _Parser:
    parser = _Parser(
        prog="citron-runner",
        description="Run builds from a citron server: clone the repository, run each "
        "script line with bash, stream the output.",
    )
    parser.add_argument(
        "url",
        nargs="*",
        help="the server's URL, e.g. ws://127.0.0.1:8765/ws or the dashboard's"
        " http://127.0.0.1:8765/; several (separate arguments, or comma-separated as for"
        " citron): tried in turn",
    )
    parser.add_argument(
        "--url",
        "-u",
        dest="url_option",
        metavar="URL",
        help=f"the server, as the argument (default $CITRON_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="PEM file of a CA (or a self-signed certificate) to trust for wss:// URLs,"
        " besides the system's ($SSL_CERT_FILE)",
    )
    parser.add_argument("--type", default="simple", help="runner type (default simple)")
    parser.add_argument(
        "--name",
        default=socket.gethostname(),
        help="a name shown to people (default: this host's name; with --spawn N, NAME-1 ...)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("CITRON_TOKEN"), help="RUNNER token (or CITRON_TOKEN)"
    )
    parser.add_argument(
        "--spawn", type=_positive, default=1, help="runner connections in this process"
    )
    parser.add_argument(
        "--workdir", help="where build directories are made (default: the system's temp)"
    )
    parser.add_argument("--once", action="store_true", help="exit after one build")
    parser.add_argument("--keep", action="store_true", help="keep each build's directory")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )
    return parser


async def _serve(args: argparse.Namespace, urls: list[str]) -> int:
    hosts = []
    for i in range(args.spawn):
        name = args.name if args.spawn == 1 or not args.name else f"{args.name}-{i + 1}"
        runner = SimpleRunner(type=args.type, name=name, workdir=args.workdir, keep=args.keep)
        hosts.append(RunnerHost(runner, urls, token=args.token, once=args.once, ca=args.ca))
    interrupts = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal interrupts
        interrupts += 1 if sig is signal.SIGINT else 0
        cancel = interrupts >= 2
        logging.getLogger("citron.runner").info(
            "%s: %s",
            sig.name,
            "cancelling builds and leaving" if cancel else "leaving after the current builds",
        )
        for host in hosts:
            host.stop(cancel_build=cancel)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    results = await asyncio.gather(*(h.serve() for h in hosts), return_exceptions=True)
    for result in results:
        if isinstance(result, AuthError):
            print(f"citron-runner: error: {result}", file=sys.stderr)
            return EXIT_NOPERM
        if isinstance(result, TrustError):
            print(f"citron-runner: error: {result}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(result, ConnectError):
            print(f"citron-runner: error: {result}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if isinstance(result, BaseException):
            raise result
    return 0


def _urls(args: argparse.Namespace) -> list[str]:
    return choose_urls(",".join(args.url) or None, args.url_option, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        urls = _urls(args)
    except UrlError as exc:
        print(f"citron-runner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(_serve(args, urls))


if __name__ == "__main__":
    sys.exit(main())
