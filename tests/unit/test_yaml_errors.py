"""``yaml_errors``: the config, the keys file and a bench scenario word their YAML problems the same way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qwen_serve.bench.config import BenchConfigError, load_scenario
from qwen_serve.config import load_config
from qwen_serve.errors import ConfigError
from qwen_serve.keys import load_keys_file

BROKEN = "a: 1\nb: [1, 2\n"  # the flow sequence is never closed
SECRET = "qs-should-never-be-quoted"


@pytest.mark.parametrize("load", [load_config, load_keys_file, load_scenario])
def test_one_wording_naming_the_position_and_never_quoting_the_line(tmp_path: Path, load: object) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(BROKEN + f"c: {SECRET}\n\t- x\n")
    with pytest.raises((ConfigError, BenchConfigError)) as info:
        load(path)  # type: ignore[operator]
    message = str(info.value)
    assert re.search(rf"{re.escape(str(path))}: line 3, column \d+: invalid YAML \(.+\)$", message)
    assert SECRET not in message
