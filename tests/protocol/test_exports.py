"""The public surface, and the core's purity."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import citron_protocol

MODULES = [
    "client",
    "codec",
    "errors",
    "hub",
    "messages",
    "records",
    "runner",
    "sections",
    "states",
]
SRC = Path(citron_protocol.__file__).parent


def test_the_top_level_is_small_and_each_name_is_its_modules() -> None:
    """About 40 names a runner, front or host author uses; the rest is in
    the documented submodules, each with its own ``__all__``."""
    assert 30 <= len(citron_protocol.__all__) <= 50
    assert citron_protocol.__all__ == sorted(set(citron_protocol.__all__))
    homes: dict[str, object] = {}
    for name in MODULES:
        module = importlib.import_module(f"citron_protocol.{name}")
        for symbol in module.__all__:
            homes.setdefault(symbol, getattr(module, symbol))
    for symbol in citron_protocol.__all__:
        assert getattr(citron_protocol, symbol) is homes[symbol], symbol
    public = {n for n in dir(citron_protocol) if not n.startswith("_")}
    assert public - set(citron_protocol.__all__) <= {*MODULES, "strategies"}


def test_nothing_mutable_is_exported() -> None:
    for name in MODULES:
        module = importlib.import_module(f"citron_protocol.{name}")
        for symbol in module.__all__:
            value = getattr(module, symbol)
            assert not isinstance(value, (list, set, bytearray)), symbol
            assert type(value).__module__.split(".")[0] != "cattrs", symbol
            if isinstance(value, dict):
                assert symbol.isupper(), symbol  # the tables: constants by name
    assert not hasattr(citron_protocol, "converter")


def test_every_module_is_listed() -> None:
    found = {p.stem for p in SRC.glob("*.py")} - {"__init__", "strategies"}
    # the hub's parts, and the optional installs' check
    private = {"_scheduler", "_session", "_snapshot", "_state", "_extras"}
    assert found == set(MODULES) | private


FORBIDDEN = {"asyncio", "socket", "sqlite3", "time", "os", "selectors", "threading", "subprocess"}


def io_imports(source: str) -> list[str]:
    """The forbidden modules a piece of Python source imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [name for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def test_the_core_imports_no_io() -> None:
    for path in SRC.glob("*.py"):
        assert io_imports(path.read_text()) == [], path.name


def test_the_purity_check_can_fail() -> None:
    sample = "import json\nimport asyncio\nfrom os import path\nfrom .codec import decode\n"
    assert io_imports(sample) == ["asyncio", "os"]


def test_py_typed_is_shipped() -> None:
    for package in ("citron_protocol", "citron_server", "citron_client"):
        assert (SRC.parent / package / "py.typed").exists()
