"""The ``qwen-serve`` command line: problems exit 2 with one line naming them; plan and keys output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwen_serve", *args], capture_output=True, text=True, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_tp_that_does_not_divide_heads() -> None:
    line = _one_line_error(run_cli("plan", "--model", "qwen2.5-7b-instruct", "--tensor-parallel-size", "3"))
    assert "tensor_parallel_size" in line and "28" in line


def test_tp4_impossible_for_half_b() -> None:
    line = _one_line_error(run_cli("plan", "--model", "qwen2.5-0.5b-instruct", "--tensor-parallel-size", "4"))
    assert "tensor_parallel_size" in line and "14" in line


def test_negative_gpu_count() -> None:
    line = _one_line_error(run_cli("plan", "--model", "qwen2.5-7b-instruct", "--gpus", "-1"))
    assert line == "qwen-serve: engine.gpus: must be a positive integer"


def test_unknown_key_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  source: qwen2.5-7b-instruct\nengine:\n  gpuz: 4\n")
    line = _one_line_error(run_cli("plan", "--config", str(cfg)))
    assert "engine.gpuz" in line and "unknown key" in line


@pytest.mark.parametrize("cmd", [["up", "--config"], ["gateway", "--config"]])
def test_up_and_gateway_refuse_bad_config(tmp_path: Path, cmd: list[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  source: x\ngateway:\n  port: -5\n")
    line = _one_line_error(run_cli(*cmd, str(cfg)))
    assert "gateway.port" in line


def test_plan_json_has_contract_keys() -> None:
    proc = run_cli("plan", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--gpus", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    for key in ("model", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
                "native_context", "max_model_len", "tensor_parallel_size", "data_parallel_size", "rope_scaling",
                "param_count", "weights_bytes_per_gpu", "kv_cache_bytes_per_token", "kv_cache_tokens_per_replica",
                "max_full_context_sequences_per_replica", "vllm_args", "warnings"):
        assert key in plan, key
    assert (plan["tensor_parallel_size"], plan["data_parallel_size"]) == (1, 4)
    assert plan["rope_scaling"] is None


def test_plan_7b_128k_uses_yarn() -> None:
    proc = run_cli("plan", "--model", "qwen2.5-7b-instruct", "--max-model-len", "131072", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert "--hf-overrides" in plan["vllm_args"]
    assert plan["vllm_args"][plan["vllm_args"].index("--host") + 1] == "127.0.0.1"


def test_keys_cli_create_then_revoke(tmp_path: Path) -> None:
    import re

    import yaml

    keys = tmp_path / "keys.yaml"
    created = run_cli("keys", "create", "--file", str(keys), "--id", "team-a", "--models", "qwen2.5-*", "--rpm", "60")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert re.fullmatch(r"qs-[A-Za-z0-9_-]{43}", secret)
    assert secret not in keys.read_text()  # only the hash is stored
    entry = yaml.safe_load(keys.read_text())["keys"][0]
    assert entry["id"] == "team-a" and entry["models"] == ["qwen2.5-*"] and entry["rpm"] == 60
    revoked = run_cli("keys", "revoke", "--file", str(keys), "--id", "team-a")
    assert revoked.returncode == 0, revoked.stderr
    assert yaml.safe_load(keys.read_text())["keys"][0]["disabled"] is True


def test_keys_cli_unknown_id_is_a_one_line_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    assert run_cli("keys", "create", "--file", str(keys), "--id", "a").returncode == 0
    line = _one_line_error(run_cli("keys", "revoke", "--file", str(keys), "--id", "nope"))
    assert "nope" in line


def test_version() -> None:
    from qwen_serve import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"qwen-serve {__version__}"


def _plan_json(*args: str) -> dict[str, Any]:
    proc = run_cli("plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_plan_prints_a_table_with_units_and_no_python_reprs() -> None:
    proc = run_cli("plan", "--model", "qwen2.5-7b-instruct", "--max-model-len", "131072", "--gpus", "4")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = {line.split("  ")[0].strip(): line.strip() for line in out.splitlines() if line.startswith(" ")}
    assert rows["max_model_len"].endswith("131,072 tokens")
    assert rows["weights per GPU"].endswith(" GiB") and rows["KV cache per replica"].endswith(" tokens")
    assert rows["rope scaling"].endswith("yarn x4 of 32,768 tokens")
    assert "{'" not in out and "[]" not in out and "None" not in out  # no dict, list or None reprs
    assert all(line == line.rstrip() for line in out.splitlines())  # no padding to copy along


def test_plan_vllm_command_pastes_into_a_shell_as_printed() -> None:
    import shlex

    proc = run_cli("plan", "--model", "qwen2.5-7b-instruct", "--max-model-len", "131072", "--gpus", "4")
    lines = proc.stdout.splitlines()
    start = lines.index("vLLM command:") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith(" \\")) + 1  # the last line
    command = lines[start:end]
    module = command.index("python -m vllm.entrypoints.openai.api_server \\")
    assert all(line.startswith("  --") for line in command[module + 1:])  # one flag (and its values) per line
    words = shlex.split("\n".join(command).replace(" \\\n", " "))
    plan = _plan_json("--model", "qwen2.5-7b-instruct", "--max-model-len", "131072", "--gpus", "4")
    env = [f"{k}={v}" for k, v in plan["env"].items()]
    assert words == [*env, "python", "-m", "vllm.entrypoints.openai.api_server", *plan["vllm_args"]]


def _keys(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("keys", *args[:1], "--file", str(tmp_path / "keys.yaml"), *args[1:])


def test_keys_list_shows_every_key_without_secrets_or_hashes(tmp_path: Path) -> None:
    import yaml

    secret = _keys(tmp_path, "create", "--id", "team-a", "--rpm", "600", "--tpm", "200000").stdout.strip()
    assert _keys(tmp_path, "create", "--id", "b", "--models", "qwen2.5-*", "--expires", "2020-01-01").returncode == 0
    _keys(tmp_path, "create", "--id", "c", "--max-concurrent", "4")
    _keys(tmp_path, "revoke", "--id", "c")
    old = secret
    rotated = _keys(tmp_path, "rotate", "--id", "team-a", "--grace", "3600")
    assert rotated.returncode == 0, rotated.stderr
    listing = _keys(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    header, _rule, *rows = [line for line in out.splitlines() if line.strip()]
    assert header.split() == ["id", "models", "limits", "created", "expires", "state"]
    by_id = {row.split()[0]: row for row in rows}
    assert "600 rpm, 200,000 tpm" in by_id["team-a"] and "active, previous secret until" in by_id["team-a"]
    assert "2020-01-01T00:00:00Z" in by_id["b"] and by_id["b"].endswith("expired") and "unlimited" in by_id["b"]
    assert "4 concurrent" in by_id["c"] and by_id["c"].endswith("revoked")
    stored = yaml.safe_load((tmp_path / "keys.yaml").read_text())["keys"]
    for secret_or_hash in (old, rotated.stdout.strip(), *(k["sha256"] for k in stored), stored[0]["previous_sha256"]):
        assert secret_or_hash not in out


def test_keys_rotate_prints_a_new_secret_once_and_keeps_the_old_one_for_the_grace(tmp_path: Path) -> None:
    import re

    from qwen_serve.keys import hash_secret, load_keys_file

    old = _keys(tmp_path, "create", "--id", "a").stdout.strip()
    proc = _keys(tmp_path, "rotate", "--id", "a", "--grace", "60")
    new = proc.stdout.strip()
    assert re.fullmatch(r"qs-[A-Za-z0-9_-]{43}", new) and new != old
    assert "the old secret works until" in proc.stderr and new not in proc.stderr
    entry = load_keys_file(tmp_path / "keys.yaml").keys[0]
    assert (entry.sha256, entry.previous_sha256) == (hash_secret(new), hash_secret(old))
    again = _keys(tmp_path, "rotate", "--id", "a")
    assert "the old secret no longer works" in again.stderr
    assert load_keys_file(tmp_path / "keys.yaml").keys[0].previous_sha256 is None
    assert "no key with id 'zz'" in _one_line_error(_keys(tmp_path, "rotate", "--id", "zz"))
    assert "--grace" in _one_line_error(_keys(tmp_path, "rotate", "--id", "a", "--grace", "-1"))


def test_keys_create_for_an_existing_id_says_how_to_rotate(tmp_path: Path) -> None:
    _keys(tmp_path, "create", "--id", "a")
    line = _one_line_error(_keys(tmp_path, "create", "--id", "a"))
    assert "already exists" in line and "keys rotate --file" in line and "--id a" in line
    _keys(tmp_path, "revoke", "--id", "a")
    line = _one_line_error(_keys(tmp_path, "create", "--id", "a"))
    assert "is revoked" in line and "keys rotate" in line and "enables it again" in line
    assert "revoke it" not in line
    assert _keys(tmp_path, "rotate", "--id", "a").returncode == 0
    assert "active" in _keys(tmp_path, "list").stdout


def test_keys_list_of_an_empty_or_broken_file(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    assert "no keys" in _keys(tmp_path, "list").stdout
    (tmp_path / "keys.yaml").write_text("keys:\n  - id: a\n    sha256: nope\n")
    assert "keys[0].sha256" in _one_line_error(_keys(tmp_path, "list"))


def test_gateway_help_says_what_it_serves() -> None:
    proc = run_cli("gateway", "--help")
    assert proc.returncode == 0 and "already running" in proc.stdout and "--upstream" in proc.stdout
