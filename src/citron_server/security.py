"""The checks an HTTP request passes before the server looks at it, the same
on both transports.

- **Host** (DNS rebinding): on a loopback listener, a request whose ``Host``
  is not a loopback name or address is refused with 403, whatever its path.
  A page on ``http://attacker.example:8765/`` whose name later resolves to
  127.0.0.1 is same-origin with itself, not with the server: its requests
  still carry ``Host: attacker.example:8765``.
- **Origin** (cross-site WebSocket hijacking): a WebSocket handshake that
  carries ``Origin`` is accepted only from the server's own origin (scheme,
  host and port those of the request's ``Host``) or from one listed with
  ``--allowed-origin``; otherwise 403. Browsers always send ``Origin`` on a
  WebSocket handshake and a page cannot forge it; other clients send none
  and are judged by their token alone.
- **Credentials**: ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``.
  Anything malformed (empty, repeated, another scheme, bytes that are not
  text) is 401, like a wrong token; nothing here raises.
- **/metrics**, when ``--metrics-token`` is set, needs
  ``Authorization: Bearer`` with that token (401 otherwise).

Adapters hand in header values as lists (a repeated header is refused, not
silently reduced to one) and turn a :class:`Refusal` into an HTTP response.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs

from citron_protocol import Role

from .settings import ConfigError

__all__ = ["FULL", "Auth", "Gate", "Refusal", "bearer", "normalize_origin", "server_tls"]

log = logging.getLogger("citron.server")


@attrs.frozen
class Refusal:
    """An HTTP answer that ends the request: its status and a one-line body."""

    status: int
    reason: str

    @property
    def body(self) -> bytes:
        return f"{self.reason}\n".encode()


UNAUTHORIZED = Refusal(401, "unauthorized: a valid token is needed")
FULL = Refusal(503, "service unavailable: too many connections, try again later")


def _bytes(text: str) -> bytes:
    # Header values come decoded with surrogate escapes for bytes that are
    # not text; any string encodes this way, and such bytes match no token.
    return text.encode("utf-8", "surrogatepass")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(_bytes(a), _bytes(b))


@attrs.frozen
class Auth:
    """Which roles a token opens. A role without a token is open to all."""

    tokens: Mapping[Role, str | None]

    @property
    def open_roles(self) -> frozenset[Role]:
        return frozenset(r for r in Role if not self.tokens.get(r))

    def roles_for(self, token: str | None) -> frozenset[Role] | None:
        """The roles a connection presenting ``token`` may use; None: refuse (401)."""
        if token is None:
            return self.open_roles or None
        matched = frozenset(
            role for role, expected in self.tokens.items() if expected and _same(expected, token)
        )
        if not matched:
            return None
        return matched | self.open_roles


def bearer(authorization: Sequence[str]) -> str | None:
    """The token of exactly one ``Authorization: Bearer TOKEN`` header; None
    for anything else (no header is the caller's case, not this one's)."""
    if len(authorization) != 1:
        return None
    scheme, _, value = authorization[0].strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


def _default_port(scheme: str) -> int:
    return 443 if scheme in ("https", "wss") else 80


def _host_port(authority: str, scheme: str) -> tuple[str, int] | None:
    """``host[:port]`` split and lower-cased, the port filled in; None if malformed."""
    try:
        parts = urlsplit(f"//{authority}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return host.lower(), port if port is not None else _default_port(scheme)


def normalize_origin(text: str) -> str:
    """``scheme://host:port`` of an origin, lower-cased with its port filled
    in; ValueError if ``text`` is not an http(s) origin."""
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        raise ValueError(f"not an origin: {text!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected an origin like https://ci.example.org:8443, got {text!r}")
    found = _host_port(parts.netloc, scheme)
    if found is None:
        raise ValueError(f"expected an origin like https://ci.example.org:8443, got {text!r}")
    host, port = found
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _printable(value: str, limit: int = 200) -> str:
    """A client-sent value, safe to put in a log line."""
    return repr(value[:limit])


class Gate:
    """Decides, from a request's headers alone, whether it goes on."""

    def __init__(
        self,
        auth: Auth,
        *,
        tls: bool = False,
        loopback: bool = False,
        allowed_origins: Iterable[str] = (),
        metrics_token: str | None = None,
    ) -> None:
        self.auth = auth
        self.scheme = "https" if tls else "http"
        self.loopback = loopback
        self.allowed_origins = frozenset(normalize_origin(o) for o in allowed_origins)
        self.metrics_token = metrics_token

    def host(self, host: Sequence[str]) -> Refusal | None:
        """The Host check, for every request."""
        if not self.loopback:
            return None
        found = _host_port(host[0], self.scheme) if len(host) == 1 else None
        if found is None or not _is_loopback(found[0]):
            shown = _printable(host[0]) if host else "none"
            log.info("refused a request for host %s on a loopback listener (403)", shown)
            return Refusal(403, "forbidden: this server answers only to a loopback host name")
        return None

    def origin(self, origin: Sequence[str], host: Sequence[str]) -> Refusal | None:
        """The Origin check, for a WebSocket handshake."""
        if not origin:
            return None
        if len(origin) == 1 and self._origin_allowed(origin[0], host):
            return None
        shown = ", ".join(_printable(o) for o in origin)
        log.info("refused a WebSocket handshake from origin %s (403)", shown)
        return Refusal(
            403, "forbidden: this origin may not open a WebSocket here (see --allowed-origin)"
        )

    def _origin_allowed(self, origin: str, host: Sequence[str]) -> bool:
        try:
            normal = normalize_origin(origin)
        except ValueError:
            return False  # "null", a file: page, junk
        if normal in self.allowed_origins:
            return True
        if len(host) != 1:
            return False
        own = _host_port(host[0], self.scheme)
        if own is None:
            return False
        name, port = own
        if ":" in name:
            name = f"[{name}]"
        return normal == f"{self.scheme}://{name}:{port}"

    def credentials(
        self, authorization: Sequence[str], query_token: Sequence[str]
    ) -> frozenset[Role] | Refusal:
        """The roles the request's token opens, or 401."""
        token: str | None
        if authorization:
            token = bearer(authorization)
        elif query_token:
            token = query_token[0] if len(query_token) == 1 and query_token[0] else None
        else:
            return self.auth.roles_for(None) or UNAUTHORIZED
        if token is None:
            return UNAUTHORIZED
        return self.auth.roles_for(token) or UNAUTHORIZED

    def websocket(
        self,
        *,
        host: Sequence[str],
        origin: Sequence[str],
        authorization: Sequence[str],
        query_token: Sequence[str],
    ) -> frozenset[Role] | Refusal:
        """Every check of a WebSocket handshake, in order: host, origin, token."""
        refused = self.host(host) or self.origin(origin, host)
        if refused is not None:
            return refused
        return self.credentials(authorization, query_token)

    def metrics(self, authorization: Sequence[str]) -> Refusal | None:
        """The ``--metrics-token`` check for ``/metrics``."""
        if self.metrics_token is None:
            return None
        token = bearer(authorization)
        if token is None or not _same(self.metrics_token, token):
            return Refusal(401, "unauthorized: /metrics needs its token")
        return None


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The TLS context of ``--tls-cert`` and ``--tls-key``; ConfigError with
    one line saying what is wrong with them."""
    texts = {}
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as f:
                texts[what] = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in texts["--tls-cert"]:
        raise ConfigError(f"--tls-cert: {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in texts["--tls-key"]:
        raise ConfigError(f"--tls-key: {key} holds no PEM private key")
    if b"ENCRYPTED" in texts["--tls-key"]:
        raise ConfigError(f"--tls-key: {key} is encrypted; citron needs an unencrypted key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # An encrypted key would make OpenSSL prompt on the terminal: refuse it.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            detail = "the key does not belong to the certificate"
        else:
            why = exc.reason if exc.reason and exc.reason != "PEM lib" else "malformed PEM"
            detail = f"the certificate or the key cannot be used ({why})"
        raise ConfigError(f"--tls-cert {cert} --tls-key {key}: {detail}") from None
    except OSError as exc:
        raise ConfigError(f"--tls-cert {cert} --tls-key {key}: {exc}") from None
    return context
