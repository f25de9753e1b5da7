"""The public surface, and the core's purity."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import citron_protocol

MODULES = ["client", "codec", "errors", "hub", "messages", "records", "runner", "states"]
SRC = Path(citron_protocol.__file__).parent


def test_top_level_all_is_the_union_of_the_modules() -> None:
    union: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(f"citron_protocol.{name}")
        union |= set(module.__all__)
        for symbol in module.__all__:
            assert getattr(citron_protocol, symbol) is getattr(module, symbol)
    assert set(citron_protocol.__all__) == union


def test_every_module_is_listed() -> None:
    found = {p.stem for p in SRC.glob("*.py")} - {"__init__", "strategies"}
    assert found == set(MODULES)


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
