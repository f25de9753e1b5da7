"""The README's quickstart is what CI runs, and its example works."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def test_ci_runs_the_readme_test_command() -> None:
    shell = blocks("sh")
    assert len(shell) == 2
    install_and_serve, test_command = (b.strip() for b in shell)
    assert install_and_serve.endswith("citron-server")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_the_readme_example_runs() -> None:
    (example,) = blocks("python")
    exec(compile(example, "README.md", "exec"), {})
