"""The dashboard's files, packaged inside citron_server and served at ``/``."""

from __future__ import annotations

from functools import cache
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


@cache
def static_file(path: str) -> tuple[bytes, str] | None:
    """The body and content type of a dashboard file, or None."""
    entry = _FILES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return resources.files("citron_server").joinpath("static", name).read_bytes(), content_type
