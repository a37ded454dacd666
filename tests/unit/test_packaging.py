"""pyproject.toml declares the Python versions the code runs on."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# asyncio.Task.uncancel (gateway.proxy) and datetime.fromisoformat of "...Z" (keys --expires) are 3.11 APIs.
OLDEST_SUPPORTED = (3, 11)


def _lower_bound() -> tuple[int, int]:
    spec = tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert match, f"requires-python {spec!r}: expected a single lower bound '>=X.Y'"
    return int(match[1]), int(match[2])


def test_requires_python_excludes_versions_without_the_apis_used() -> None:
    assert _lower_bound() >= OLDEST_SUPPORTED


def test_the_tested_interpreter_is_one_the_package_declares() -> None:
    assert sys.version_info[:2] >= _lower_bound()
