"""The dashboard's files, packaged inside citron_server and served at ``/``."""

from __future__ import annotations

from importlib import resources

__all__ = ["HEADERS", "static_file"]

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}

#: Sent with every file: nothing from elsewhere may load or run.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("citron_server").joinpath("static")
    return {
        path: (folder.joinpath(name).read_bytes(), content_type)
        for path, (name, content_type) in _FILES.items()
    }


#: Read once: a request for any other path finds nothing and keeps nothing.
_TABLE = _load()


def static_file(path: str) -> tuple[bytes, str] | None:
    """The body and content type of a dashboard file, or None."""
    return _TABLE.get(path)
