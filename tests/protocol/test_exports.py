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


def test_the_core_imports_no_io() -> None:
    for path in SRC.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_the_purity_check_can_fail(tmp_path: Path) -> None:
    sample = "import asyncio\nfrom os import path\n"
    tree = ast.parse(sample)
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert len(hits) == 2


def test_py_typed_is_shipped() -> None:
    for package in ("citron_protocol", "citron_server", "citron_client"):
        assert (SRC.parent / package / "py.typed").exists()
