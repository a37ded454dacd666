"""The README's shell blocks run as shown (those that need no GPU and no running stack).

Every command line of every ```sh block runs with bash in a fresh directory, in order, with this
virtualenv's ``qwen-serve`` first on ``PATH``. A ```yaml block right after a paragraph ending in
``(`NAME`):`` is written to ``NAME`` first, so the commands that use it find it. A ``# text`` line right
under a command is output the README promises: it must appear in that command's output (runs of spaces
compared as one). A command exits 0, unless its promised output is an error line (``qwen-serve: ...``), which
must then be the one line on stderr with exit status 2. Commands in :data:`NOT_RUN` are skipped, each for
the reason given there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

# Command prefix → why the test does not run it.
NOT_RUN = {
    "make demo": "builds its own virtualenv and serves until Ctrl-C (the demo's own tests cover it)",
    "make test": "the whole test suite",
    "qwen-serve up": "starts vLLM on 4 GPUs",
    ".venv/bin/qwen-serve bench run": "needs `make demo` serving in another terminal",
}


@dataclass
class Command:
    line: str
    expected: list[str] = field(default_factory=list)


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """``(language, body, paragraph before)`` of every fenced block."""
    out = []
    for match in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
        before = text[:match.start()].rstrip().rsplit("\n\n", 1)[-1]
        out.append((match.group(1), match.group(2), before))
    return out


def _files_and_commands(text: str) -> tuple[dict[str, str], list[Command]]:
    files: dict[str, str] = {}
    commands: list[Command] = []
    for lang, body, before in _blocks(text):
        name = re.search(r"\(`([^`]+)`\):$", before)
        if lang == "yaml" and name:
            files[name.group(1)] = body
        if lang != "sh":
            continue
        for raw in body.splitlines():
            if raw.startswith("# ") and commands:
                commands[-1].expected.append(raw[2:])
            elif raw.strip() and not raw.lstrip().startswith("#"):  # not a comment continuing the line above
                commands.append(Command(raw.split("   #")[0].strip()))
    return files, commands


def _squeeze(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text)


FILES, COMMANDS = _files_and_commands(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_commands_and_every_skip_is_still_used() -> None:
    assert any(c.line.startswith("qwen-serve plan") for c in COMMANDS)
    for prefix in NOT_RUN:
        assert any(c.line.startswith(prefix) for c in COMMANDS), f"NOT_RUN lists {prefix!r}, the README no longer has it"


def test_readme_shell_blocks_run_as_shown(tmp_path: Path) -> None:
    for name, body in FILES.items():
        (tmp_path / name).write_text(body)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env = {k: v for k, v in env.items() if not k.startswith("QWEN_SERVE_")}
    ran = 0
    for command in COMMANDS:
        if any(command.line.startswith(prefix) for prefix in NOT_RUN):
            continue
        proc = subprocess.run(["bash", "-c", command.line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        ran += 1
        errors = [e for e in command.expected if e.startswith("qwen-serve: ")]
        if errors:
            assert proc.returncode == 2, (command.line, proc.stdout, proc.stderr)
            assert proc.stderr.strip().splitlines() == errors, command.line
            continue
        assert proc.returncode == 0, (command.line, proc.stdout, proc.stderr)
        output = _squeeze(proc.stdout + proc.stderr)
        for line in command.expected:
            assert _squeeze(line) in output, (command.line, line, proc.stdout)
    assert ran >= 4


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.line.startswith("qwen-serve keys create")],
                         ids=lambda c: c.line)
def test_keys_create_in_the_readme_prints_one_secret(tmp_path: Path, command: Command) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", command.line], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"qs-[A-Za-z0-9_-]{43}\n", proc.stdout)
